"""`llmprune bench`."""
from __future__ import annotations

from typing import Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune bench m24                         # kernel table + decode tokens/s, float16

  llmprune bench m24 --dtype bfloat16 --json
"""


@app.command(epilog=EXAMPLES)
@user_errors
def bench(
    model: Optional[str] = typer.Argument(None, help="Pruned directory (dense or compressed), Hub id or .gguf."),
    dtype: str = typer.Option("float16", help="float16 or bfloat16."),
    repeats: int = typer.Option(50, help="Timed runs per measurement (median reported)."),
    decode_tokens: int = typer.Option(128, help="Tokens generated for the end-to-end decode speed."),
    tokens: str = typer.Option("1,16,2048", help="Token counts of the kernel table, comma-separated."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    verbose: bool = VERBOSE,
):
    """Kernel speed per linear shape (dense cuBLAS, ours, torch's 2:4) and decode tokens/s, on a CUDA GPU."""
    setup_logging(verbose, quiet=json_output)
    import torch

    from llmprune import bench as b
    from llmprune.checkpoint import load_model
    from llmprune.errors import LlmpruneError

    kinds = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in kinds:
        raise LlmpruneError(f"--dtype must be float16 or bfloat16 (the kernels' types); got '{dtype}'.")
    try:
        token_counts = tuple(int(t) for t in tokens.split(","))
    except ValueError:
        raise LlmpruneError(f"--tokens takes comma-separated whole numbers, e.g. 1,16,2048; got '{tokens}'.") from None
    if not token_counts or min(token_counts) < 1:
        raise LlmpruneError(f"--tokens takes counts of at least 1; got '{tokens}'.")
    b.require_gpu()
    loaded, _, _ = load_model(model)
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
