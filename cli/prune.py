"""`llmprune prune`."""
from __future__ import annotations

from typing import List, Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import ALLOW_PICKLE, TRUST_REMOTE_CODE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune prune smollm2 --method sparsegpt --pattern 2:4 --calib wikitext2-valid --out smollm2-24

  llmprune prune meta-llama/Llama-3.2-1B --method wanda --sparsity 0.5 --out llama-wanda50

  llmprune prune ./model.gguf --method magnitude --pattern 4:8 --ignore 'mlp\\.down_proj' --out m48
"""


@app.command(epilog=EXAMPLES)
@user_errors
def prune(
    model: Optional[str] = typer.Argument(None, help="Hub id, local model directory, .gguf file, or 'smollm2' (default: the bundled SmolLM2-135M-Instruct)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (written only when complete)."),
    method: str = typer.Option("sparsegpt", help="magnitude, wanda or sparsegpt."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of weights to prune, in [0, 1). Default 0.5; N:M patterns imply 1 - N/M."),
    pattern: str = typer.Option("unstructured", help="'unstructured' or N:M (at most N non-zeros in every M consecutive inputs), e.g. 2:4, 4:8."),
    calib: str = typer.Option("c4", "--calib", help="Calibration text: c4, wikitext2 (Hub), wikitext2-valid (bundled, offline), PATH.txt or PATH.jsonl."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window (capped at the model's max positions)."),
    seed: int = typer.Option(0, help="Seed of the window sampling."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Regex on full linear names to leave dense (repeatable). lm_head and embeddings are never pruned."),
    sequential: bool = typer.Option(True, "--sequential/--two-pass", help="One pass per block, each linear calibrated on pruned upstream outputs (default), or the reference scripts' dense-statistics pass plus a propagation pass."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto (the model's own), float32, float16 or bfloat16; also the saved dtype."),
    microbatch: Optional[int] = typer.Option(None, help="Calibration windows per forward call (default: about 2048 tokens)."),
    format: str = typer.Option("compressed", "--format", help="compressed (compressed-tensors sparse layout: 2:4 → sparse-24-bitmask, else sparse-bitmask; smaller) or dense (zeros stored; loads with plain transformers)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out directory."),
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Prune MODEL layer by layer and save the pruned checkpoint (safetensors, zeros where pruned)."""
    setup_logging(verbose, quiet=json_output)
    from llmprune.api import prune as run_prune

    _, report = run_prune(
        model, out=out, overwrite=overwrite, device=device, dtype=None if dtype == "auto" else dtype,
        microbatch=microbatch, format=format, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, method=method, sparsity=sparsity, pattern=pattern, calibration=calib,
        nsamples=nsamples, seqlen=seqlen, seed=seed, ignore=tuple(ignore or ()), sequential=sequential,
    )
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
