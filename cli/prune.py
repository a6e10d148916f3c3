"""`llmprune prune`."""
from __future__ import annotations

from typing import List, Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import ALLOW_PICKLE, OVERWRITE, TRUST_REMOTE_CODE, VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune prune smollm2 --method sparsegpt --pattern 2:4 --calib wikitext2-valid --out smollm2-24

  llmprune prune meta-llama/Llama-3.2-1B --method wanda --sparsity 0.5 --out llama-wanda50

  llmprune prune smollm2 --method wanda --sparsity 0.7 --allocation owl --refine dsnot --out m70

  llmprune prune smollm2 --method alps --sparsity 0.7 --out m70   # ADMM: the lowest perplexity at 70%

  llmprune prune smollm2 --method admm --sparsity 0.7 --out m70a  # Boža's ADMM: most of ALPS's gain, faster

  llmprune prune smollm2 --method sparsegpt --pattern 2:4 --quantize w4a16 --out m24q4   # 2:4 + int4, GPTQ keeping the zeros

  llmprune prune smollm2 --quantize w8a16 --group-size 0 --sparsity 0 --out mq8   # GPTQ alone, one scale per row

  llmprune prune smollm2 --recipe owl-dsnot-70 --calib wikitext2-valid --out m70   # a shipped recipe, one field changed

  llmprune prune ./model.gguf --method magnitude --pattern 4:8 --ignore 'mlp\\.down_proj' --out m48

  llmprune prune meta-llama/Llama-3.1-70B --method sparsegpt --pattern 2:4 --stream --out l70   # RAM < model

  torchrun --nproc-per-node 8 -m llmprune prune MODEL --method wanda --sparsity 0.5 --out m        # 8 processes

  llmprune prune MODEL --method wanda --sparsity 0.5 --out m --resume    # after a crash or Ctrl-C
"""


@app.command(epilog=EXAMPLES)
@user_errors
def prune(
    model: Optional[str] = typer.Argument(None, help="Hub id, local model directory, .gguf file, or 'smollm2' (default: the bundled SmolLM2-135M-Instruct)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (written only when complete)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="YAML recipe file, or the name of a shipped one (sparsegpt-2of4, owl-dsnot-70, ...). Flags below override its fields."),
    method: Optional[str] = typer.Option(None, help="magnitude, wanda, sparsegpt, alps (ADMM with a penalty schedule and a refit: the lowest perplexity at 60%+ and 2:4, in about twice SparseGPT's time) or admm (Boža's ADMM with a gradual mask: between the two, at 70% in about 1.2× SparseGPT's time). [default: sparsegpt]"),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of weights to prune, in [0, 1). Default 0.5; N:M patterns imply 1 - N/M."),
    pattern: Optional[str] = typer.Option(None, help="'unstructured' or N:M (at most N non-zeros in every M consecutive inputs), e.g. 2:4, 4:8. [default: unstructured]"),
    allocation: Optional[str] = typer.Option(None, help="uniform (every linear at --sparsity) or owl (per-block sparsity from outlier ratios, within ±λ, same overall sparsity; unstructured only). [default: uniform]"),
    owl_m: Optional[float] = typer.Option(None, "--owl-m", help="OWL outlier threshold: a score above M × its block's mean. [default: 5]"),
    owl_lambda: Optional[float] = typer.Option(None, "--owl-lambda", help="OWL: block sparsities stay within ±λ of the target. [default: 0.08]"),
    refine: Optional[str] = typer.Option(None, help="none, or dsnot: prune-and-grow on each linear's mask; a row is kept refined only where its output error drops. [default: none]"),
    dsnot_cycles: Optional[int] = typer.Option(None, "--dsnot-cycles", help="DSnoT: most swap cycles per linear. [default: 50]"),
    dsnot_threshold: Optional[float] = typer.Option(None, "--dsnot-threshold", help="DSnoT: a row stops once its expected output shift is below this. [default: 0.1]"),
    alps_budget: Optional[str] = typer.Option(None, "--alps-budget", help="ALPS and ADMM, unstructured: layer (keep the layer's largest weights, as ALPS) or row (every output row equally sparse, as Wanda and SparseGPT). [default: layer]"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="none, w4a16 or w8a16: round the pruned weights to int4/int8 (16-bit activations) by GPTQ from the same statistics, keeping every zero; saved in compressed-tensors' pack-quantized format, which plain transformers and vLLM load. --sparsity 0 for GPTQ alone. [default: none]"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Quantization: inputs sharing one scale; 0 for one scale per output row. [default: 128]"),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="Quantization: zero point 0, or one zero point per group. [default: symmetric]"),
    actorder: Optional[bool] = typer.Option(None, "--actorder/--no-actorder", help="Quantization: GPTQ rounds the inputs by descending activation energy (diag XᵀX), every group's scales chosen first (llm-compressor's 'static' act order; same layout). [default: on for GPTQ alone (--sparsity 0), off after pruning, where it measured worse]"),
    observer: Optional[str] = typer.Option(None, "--observer", help="Quantization: how a group's range is chosen: mse (shrunk where that lowers the group's rounding error weighted by activation energy) or minmax (its minimum and maximum). [default: mse]"),
    quant_passes: Optional[str] = typer.Option(None, "--quant-passes", help="Quantization: coordinate-descent passes over GPTQ's codes towards the weights before pruning (QuantEase); each lowers every layer's output error; 0 keeps GPTQ's codes. [default: auto: 6 after pruning, 0 for GPTQ alone]"),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: c4, wikitext2 (Hub), wikitext2-valid (bundled, offline), PATH.txt or PATH.jsonl. [default: c4]"),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows. [default: 128]"),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (capped at the model's max positions). [default: 2048]"),
    seed: Optional[int] = typer.Option(None, help="Seed of the window sampling. [default: 0]"),
    target: Optional[List[str]] = typer.Option(None, "--target", help="Regex on full linear names to prune (repeatable); default every linear of every decoder block."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Regex on full linear names to leave dense (repeatable). lm_head and embeddings are never pruned."),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--two-pass", help="One pass per block, each linear calibrated on pruned upstream outputs (default), or the reference scripts' dense-statistics pass plus a propagation pass."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto (the model's own), float32, float16 or bfloat16; also the saved dtype."),
    microbatch: Optional[int] = typer.Option(None, help="Calibration windows per forward call (default: about 2048 tokens)."),
    checkpoint_every: Optional[float] = typer.Option(None, "--checkpoint-every", min=0, help="Least seconds between two saves of the run's state in OUT.partial/ (0: after every block); a crash or Ctrl-C loses at most this much work. [default: 60]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run kept in OUT.partial/ (same options) after its last finished block."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Read one decoder block at a time from the safetensors shards, so memory holds about one block, not the model. [default: when the model would take over half the free memory]"),
    offload_activations: Optional[str] = typer.Option(None, "--offload-activations", help="Keep the calibration activations in this directory, one micro-batch in memory at a time (runs the two-pass schedule). [default: in OUT.partial/ when they would not fit in memory; where only the two-pass schedule's fit, it runs in memory]"),
    format: str = typer.Option("compressed", "--format", help="compressed (llmprune's sparse layout: 2:4 → sparse-24-bitmask, else sparse-bitmask; smaller; loads with llmprune, or transformers after `import llmprune`), dense (zeros stored; loads anywhere) or compressed-tensors (compressed-tensors 0.14's exact layout, for transformers 4 with compressed-tensors <= 0.14)."),
    overwrite: bool = OVERWRITE,
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    verbose: bool = VERBOSE,
):
    """Prune MODEL layer by layer and save the pruned checkpoint (safetensors; the recipe used goes beside it).

    Work in progress lives in OUT.partial/ and becomes OUT/ only when complete. Under torchrun every process
    takes a share of the calibration data and of the solves; rank 0 writes and reports.
    """
    import os

    main_rank = os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1")
    setup_logging(verbose, quiet=json_output or not main_rank)
    from llmprune.api import prune as run_prune
    from llmprune.recipe import Recipe, load_recipe

    given = {"method": method, "sparsity": sparsity, "pattern": pattern, "allocation": allocation, "owl_m": owl_m,
             "owl_lambda": owl_lambda, "refine": refine, "dsnot_cycles": dsnot_cycles, "dsnot_threshold": dsnot_threshold,
             "alps_budget": alps_budget, "quantize": quantize, "group_size": group_size, "symmetric": symmetric,
             "actorder": actorder, "observer": observer, "quant_passes": quant_passes, "calibration": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "sequential": sequential,
             "targets": tuple(target) if target else None, "ignore": tuple(ignore) if ignore else None}
    given = {k: v for k, v in given.items() if v is not None}
    chosen = load_recipe(recipe).override(**given) if recipe else Recipe.create(**given)
    _warn_unused(given, chosen)
    from llmprune.distributed import shutdown

    try:
        _, report = run_prune(
            model, recipe=chosen, out=out, overwrite=overwrite, device=device, dtype=None if dtype == "auto" else dtype,
            microbatch=microbatch, format=format, resume=resume, checkpoint_every=checkpoint_every, stream=stream,
            offload_activations=offload_activations,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
    finally:
        shutdown()
    if not main_rank:
        return
    if json_output:
        print_json(report)
    else:
        _render(report)


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    recipe = report["recipe"]
    table = Table(title=f"{recipe['method']} · {recipe['pattern']} · target sparsity {recipe['sparsity']:.2%}")
    table.add_column("linear")
    table.add_column("shape", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("time (s)", justify="right")
    for row in report["linears"]:
        table.add_row(row["name"], "×".join(map(str, row["shape"])), f"{row['sparsity']:.2%}", f"{row['seconds']:.2f}")
    console = Console()
    console.print(table)
    allocated = report.get("allocation")
    if allocated:
        console.print(f"OWL (M={allocated['m']:g}, λ={allocated['lambda']:g}) block sparsities: "
                      + " ".join(f"{v:.3f}" for v in allocated["block_sparsity"]))
    refined = [row["refine"] for row in report["linears"] if row.get("refine")]
    if refined:
        before = sum(r["error_before"] for r in refined)
        after = sum(r["error_after"] for r in refined)
        rows = sum(r["rows_refined"] for r in refined)
        total_rows = sum(r["rows"] for r in refined)
        console.print(f"DSnoT kept {rows} of {total_rows} rows refined ({sum(r['swaps'] for r in refined)} swaps); "
                      f"summed output error on the calibration data {after / before if before else 1:.4f}× the solver's")
    fallbacks = [row for row in report["linears"] if row.get("fallback")]
    if fallbacks:
        console.print(f"[yellow]{len(fallbacks)} expert projections saw fewer calibration tokens than their input width and "
                      f"were pruned by {fallbacks[0]['fallback']}; add calibration data to reach them: "
                      + ", ".join(f"{row['name']} ({row['tokens']} tokens)" for row in fallbacks[:8])
                      + (" ..." if len(fallbacks) > 8 else "") + "[/yellow]")
    t = report["timings"]
    calibration = (f"calibration {recipe['nsamples']} × {report['seqlen_used']} tokens of {recipe['calibration']}"
                   if "data_s" in t else "no calibration data needed")
    console.print(
        f"{len(report['linears'])} linears, overall sparsity {report['sparsity']:.2%}; "
        f"load {t['load_s']:.1f}s, data {t.get('data_s', 0):.1f}s, prune {t['prune_s']:.1f}s, "
        f"total {t['total_s']:.1f}s; {calibration}"
    )
    if report.get("output"):
        sizes = report.get("sizes")
        ratio = f"; linear weights {sizes['linear_stored_bytes'] / sizes['linear_dense_bytes']:.3f}× their dense size" if sizes else ""
        console.print(f"saved to {report['output']} ({report.get('format', 'dense')}{ratio})")
    else:
        console.print("not saved (no --out given)")


def _warn_unused(given: dict, recipe) -> None:
    """A warning for each flag the run will not use (a quantization option without --quantize, ...): a typo in a long
    command line should not pass silently."""
    import logging

    unused = {"--quantize": ("group_size", "symmetric", "actorder", "observer", "quant_passes"),
              "--allocation owl": ("owl_m", "owl_lambda"), "--refine dsnot": ("dsnot_cycles", "dsnot_threshold")}
    active = {"--quantize": recipe.quantize != "none", "--allocation owl": recipe.allocation == "owl",
              "--refine dsnot": recipe.refine == "dsnot"}
    for needs, names in unused.items():
        for name in names:
            if name in given and not active[needs]:
                logging.getLogger("llmprune").warning("--%s has no effect without %s; it is ignored",
                                                      name.replace("_", "-"), needs)
    if not recipe.needs_data and recipe.allocation != "owl":
        for name in ("calibration", "nsamples", "seqlen", "seed"):
            if name in given:
                logging.getLogger("llmprune").warning("--%s has no effect: %s needs no calibration data; it is ignored",
                                                      "calib" if name == "calibration" else name, recipe.method)
