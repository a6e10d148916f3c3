"""`llmprune bench`."""
from __future__ import annotations

from typing import Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune bench m24                         # on a GPU: kernel table + decode tokens/s, float16

  llmprune bench m24 --dtype bfloat16 --json

  llmprune bench m50 --device cpu            # on the CPU: dense fp32/bf16, torch CSR and ours, + decode

  llmprune bench m50 --device cpu --values-dtype bfloat16 --tokens 1,16
"""


@app.command(epilog=EXAMPLES)
@user_errors
def bench(
    model: Optional[str] = typer.Argument(None, help="Pruned directory (dense or compressed), Hub id or .gguf."),
    device: str = typer.Option("auto", help="cuda, cpu, or auto (a CUDA GPU where one is visible)."),
    dtype: str = typer.Option("float16", help="GPU: float16 or bfloat16."),
    values_dtype: str = typer.Option("float32,bfloat16", help="CPU: the kept values' dtypes to measure, comma-separated."),
    repeats: int = typer.Option(50, help="Timed runs per measurement (median reported)."),
    decode_tokens: int = typer.Option(128, help="Tokens generated for the end-to-end decode speed."),
    prompt: int = typer.Option(64, help="CPU: prompt tokens before the decode."),
    tokens: Optional[str] = typer.Option(None, help="Token counts of the kernel table, comma-separated "
                                         "(default 1,16,2048 on a GPU, 1,4,16,512 on the CPU)."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    verbose: bool = VERBOSE,
):
    """Kernel speed per linear shape and greedy decode tokens/s, dense against ours: on a CUDA GPU (cuBLAS, ours,
    torch's 2:4) or on the CPU (F.linear fp32 and bf16, torch's CSR, ours with fp32 and bf16 values; with bf16 values
    also bf16 activations, and the decode of the model cast to bf16, dense and ours)."""
    setup_logging(verbose, quiet=json_output)
    import torch

    from llmprune import bench as b
    from llmprune.checkpoint import load_model
    from llmprune.errors import LlmpruneError

    if device not in ("auto", "cpu", "cuda"):
        raise LlmpruneError(f"--device must be cuda, cpu or auto; got '{device}'.")
    if not 1 <= repeats <= 100000:
        raise LlmpruneError(f"--repeats must be between 1 and 100000 timed runs; got {repeats}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if tokens is None:
        tokens = "1,16,2048" if device == "cuda" else "1,4,16,512"
    if device == "cpu":
        return _bench_cpu(model, values_dtype, tokens, repeats, decode_tokens, prompt, json_output)
    kinds = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in kinds:
        raise LlmpruneError(f"--dtype must be float16 or bfloat16 (the kernels' types); got '{dtype}'.")
    token_counts = _token_counts(tokens)
    b.require_gpu()
    loaded, _, _ = load_model(model)
    _check_positions(loaded, decode_tokens + 24)  # its prompt (16) and cache margin (8)
    result = {"environment": b.environment(),
              "kernels": b.kernel_table(loaded, dtype=kinds[dtype], tokens=token_counts, repeats=repeats),
              "decode": b.decode_speed(loaded, tokens=decode_tokens, dtype=kinds[dtype])}
    if json_output:
        print_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    import sys

    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets the whole table
    console.print("environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()))
    table = Table(title=f"kernels ({dtype}, median of {repeats})")
    for column in ("shape", "layout", "tokens", "dense µs", "ours µs", "torch 2:4 µs", "speedup", "vs torch 2:4",
                   "dense TFLOP/s", "ours TFLOP/s", "ours GB/s", "rel. error"):
        table.add_column(column, justify="right")
    fmt = lambda v, scale=1e6: "—" if v is None else f"{v * scale:.1f}"  # noqa: E731
    for r in result["kernels"]:
        table.add_row("×".join(map(str, r["shape"])), r["layout"], str(r["tokens"]), fmt(r["dense_s"]), fmt(r["ours_s"]),
                      fmt(r["torch_semi_s"]), f"{r['speedup']:.2f}×",
                      "—" if r["speedup_vs_torch_semi"] is None else f"{r['speedup_vs_torch_semi']:.2f}×",
                      f"{r['dense_tflops']:.1f}", f"{r['ours_tflops']:.1f}", f"{r['ours_gbs']:.0f}", f"{r['rel_err']:.1e}")
    console.print(table)
    env = result["environment"]
    if "copy_gbs" in env:
        console.print(f"measured ceilings: copy {env['copy_gbs']:.0f} GB/s, bf16 matmul {env['bf16_tflops']:.0f} TFLOP/s")
    d = result["decode"]
    console.print(f"decode ({d['sparse_timing']}): dense {d['dense_tokens_per_s']:.1f} tok/s, sparse "
                  f"{d['sparse_tokens_per_s']:.1f} tok/s ({d['speedup']:.2f}×); {d['weights']['swapped']} linears at "
                  f"{d['weights']['stored_bytes'] / max(d['weights']['dense_bytes'], 1):.3f}× their dense bytes")


def _token_counts(tokens: str) -> tuple[int, ...]:
    from llmprune.errors import LlmpruneError

    try:
        token_counts = tuple(int(t) for t in tokens.split(","))
    except ValueError:
        raise LlmpruneError(f"--tokens takes comma-separated whole numbers, e.g. 1,16,2048; got '{tokens}'.") from None
    if not token_counts or min(token_counts) < 1:
        raise LlmpruneError(f"--tokens takes counts of at least 1; got '{tokens}'.")
    return token_counts


def _check_positions(model, needed: int) -> None:
    """The decode's prompt and new tokens within the positions the model was built for, or a one-line error."""
    from llmprune.errors import LlmpruneError
    from llmprune.models import max_positions

    limit = max_positions(model)
    if limit is not None and needed > limit:
        raise LlmpruneError(f"the decode needs {needed} positions (--prompt and --decode-tokens), beyond this model's "
                            f"{limit}; pass smaller values.")


def _bench_cpu(model, values_dtype: str, tokens: str, repeats: int, decode_tokens: int, prompt: int, json_output: bool):
    import sys

    import torch

    from llmprune import bench_cpu as b
    from llmprune import cpu_kernels
    from llmprune.checkpoint import load_model
    from llmprune.errors import LlmpruneError

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    wanted = [v.strip() for v in values_dtype.split(",") if v.strip()]
    if not wanted or any(v not in names for v in wanted):
        raise LlmpruneError(f"--values-dtype takes float32, bfloat16 or float16, comma-separated; got '{values_dtype}'.")
    if decode_tokens < 2 or prompt < 1:
        raise LlmpruneError("--decode-tokens must be at least 2 and --prompt at least 1.")
    token_counts = _token_counts(tokens)
    if cpu_kernels.refusal() is not None:
        raise LlmpruneError(f"the CPU kernels cannot run here: {cpu_kernels.refusal()}.")
    loaded, _, _ = load_model(model, dtype="float32")
    _check_positions(loaded, prompt + decode_tokens)
    dtypes = tuple(names[v] for v in wanted)
    result = {"environment": b.environment(),
              "kernels": b.kernel_table(loaded, tokens=token_counts, repeats=repeats, value_dtypes=dtypes)}
    if not result["kernels"]:
        raise LlmpruneError("this model has no pruned linears (at least 30% zeros) to measure; prune it first.")
    halves = tuple(dt for dt in dtypes if dt != torch.float32)
    result["decode"] = b.decode_speed(loaded, tokens=decode_tokens, prompt=prompt, value_dtypes=dtypes,
                                      model_dtypes=halves)
    if json_output:
        print_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print("environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()))
    ours = ["ours_" + v for v in wanted]
    models = [o + "_model" for o in ours if o != "ours_float32"]
    table = Table(title=f"CPU kernels (median; weights rotated over copies larger than the {result['environment']['llc_mib']} MiB cache)")
    for column in ("shape", "sparsity", "tokens", "path", "dense fp32 ms", "dense bf16 ms", "torch CSR ms",
                   *[f"{o[5:]} ms" for o in ours], *[f"{o[5:]} speedup" for o in ours],
                   *[f"{o[5:-6]} model speedup" for o in models], "dense GB/s",
                   *[f"{o[5:]} GB/s" for o in ours], "rel. error"):
        table.add_column(column, justify="right")
    for r in result["kernels"]:
        table.add_row("×".join(map(str, r["shape"])), f"{r['sparsity']:.2f}", str(r["tokens"]), r["method"],
                      f"{r['dense_s'] * 1e3:.3f}", f"{r['dense_bf16_s'] * 1e3:.3f}", f"{r['csr_s'] * 1e3:.3f}",
                      *[f"{r[o + '_s'] * 1e3:.3f}" for o in ours], *[f"{r[o + '_speedup']:.2f}×" for o in ours],
                      *[f"{r[o + '_speedup']:.2f}×" for o in models], f"{r['dense_gbs']:.1f}", *[f"{r[o + '_gbs']:.1f}" for o in ours],
                      f"{max(r[o + '_rel_err'] for o in ours):.1e}")
    console.print(table)
    d = result["decode"]
    console.print(f"decode (batch 1, {d['prompt']}-token prompt, {d['tokens']} greedy tokens): dense "
                  f"{d['dense']['tokens_per_s']:.2f} tok/s")
    for o in ours:
        e = d[o]
        console.print(f"  ours, {o[5:]} values: {e['tokens_per_s']:.2f} tok/s ({e['speedup']:.2f}×), same tokens as dense: "
                      f"{e['same_tokens']}; {e['swapped']} linears at {e['stored_over_dense']:.3f}× their dense bytes"
                      + (f", {e['dense_kernel']} left dense through our dense kernel" if e["dense_kernel"] else ""))
    for o in models:
        e, short = d[o], o[5:-6]
        console.print(f"  the model in {short}: dense {d['dense_' + short]['tokens_per_s']:.2f} tok/s, ours "
                      f"{e['tokens_per_s']:.2f} tok/s ({e['speedup']:.2f}× dense float32, {e['speedup_over_same_dtype']:.2f}× "
                      f"dense {short}), same tokens as dense {short}: {e['same_tokens']}")
    for name in ("dense", *ours, *models):
        br = d[name]["breakdown"]
        console.print(f"  a step of {name}: {br['step_s'] * 1e3:.1f} ms = linears {br['linears_s'] * 1e3:.1f} + head "
                      f"{br['head_s'] * 1e3:.1f} + other operators {br['other_ops_s'] * 1e3:.1f} + Python and glue "
                      f"{br['python_s'] * 1e3:.1f} ({br['note']})")
