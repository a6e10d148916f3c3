"""`llmprune info`: per-linear sparsity, pattern check, sizes, recipe and eval of a checkpoint."""
from __future__ import annotations

from typing import Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune info smollm2-sparsegpt-24

  llmprune info m70 --plot m70-sparsity.png      # per-block sparsity of a non-uniform (OWL) run

  llmprune info ./any-compressed-tensors-checkpoint --json
"""


@app.command(epilog=EXAMPLES)
@user_errors
def info(
    directory: str = typer.Argument(..., help="A model directory (llmprune's, or any dense or compressed-tensors sparse checkpoint)."),
    plot: Optional[str] = typer.Option(None, help="Also draw per-block sparsity to this PNG file (needs matplotlib)."),
    json_output: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout."),
    verbose: bool = VERBOSE,
):
    """What a checkpoint holds: per-linear sparsity and N:M check, dense vs stored bytes, recipe, versions, eval."""
    setup_logging(verbose, quiet=json_output)
    from llmprune.describe import describe
    from llmprune.describe import plot as draw

    result = describe(directory)
    if plot:
        result["plot"] = str(draw(result, plot))
    if json_output:
        print_json(result)
    else:
        render(result)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    pattern = result["pattern"]
    table = Table(title=f"{result['directory']} · format {result['format']}" + (f" · pattern {pattern}" if pattern else ""))
    for col, justify in (("linear", "left"), ("shape", "right"), ("sparsity", "right"), ("dense MiB", "right"),
                         ("stored MiB", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    if pattern:
        table.add_column(f"{pattern} holds", justify="center")
    for row in result["linears"]:
        cells = [row["name"], "×".join(map(str, row["shape"])), f"{row['sparsity']:.2%}", _mib(row["dense_bytes"]),
                 _mib(row["stored_bytes"]), f"{row['stored_bytes'] / row['dense_bytes']:.3f}"]
        if pattern:
            ok = row.get("pattern_ok")
            cells.append("—" if ok is None else ("yes" if ok else "[red]NO[/red]"))
        table.add_row(*cells)
    console.print(table)
    s = result["sizes"]
    console.print(f"linear layers: {_mib(s['linear_stored_bytes'])} MiB stored vs {_mib(s['linear_dense_bytes'])} MiB dense "
                  f"({s['linear_ratio']:.3f}×); whole directory {_mib(s['directory_bytes'])} MiB vs "
                  f"{_mib(s['directory_dense_bytes'])} MiB dense ({s['directory_ratio']:.3f}×); overall sparsity {result['sparsity']:.2%}")
    q = result.get("quantization")
    if q:
        console.print(f"quantized {q['scheme']}, {q['linears']} linears: {q['bits_per_weight']:.2f} bits per weight (codes and "
                      f"scales); their sparsity {q['sparsity_kept']:.2%} is kept as zero codes, stored like any other value")
    if pattern:
        if result["pattern_ok"]:
            console.print(f"pattern {pattern}: every group holds (checked on every pruned linear)")
        else:
            console.print(f"[red]pattern {pattern} broken in {len(result['pattern_failures'])} linears: "
                          f"{', '.join(result['pattern_failures'][:5])}[/red]")
    if result.get("recipe"):
        r = result["recipe"]
        extras = "".join([f" · OWL (M={r.get('owl_m')}, λ={r.get('owl_lambda')})" if r.get("allocation") == "owl" else "",
                          f" · DSnoT ({r.get('dsnot_cycles')} cycles)" if r.get("refine") == "dsnot" else "",
                          f" · GPTQ {r.get('quantize')} g{r.get('group_size')}" if r.get("quantize", "none") != "none" else "",
                          " (stored de-quantized here: converted)" if r.get("quantize", "none") != "none"
                          and not result.get("quantization") else ""])
        console.print(f"recipe: {r.get('method')} · sparsity {r.get('sparsity')} · {r.get('pattern')}{extras} · calibration "
                      f"{r.get('nsamples')}×{r.get('seqlen')} of {r.get('calibration')} · seed {r.get('seed')}")
    experts = result.get("experts") or []
    if experts:
        table = Table(title="experts: calibration tokens routed to each (from llmprune.json)")
        for col, justify in (("expert projection", "left"), ("tokens", "right"), ("sparsity", "right"), ("pruned by", "left")):
            table.add_column(col, justify=justify)
        method = (result.get("recipe") or {}).get("method", "")
        for row in experts:
            table.add_row(row["name"], str(row["tokens"]), f"{row['sparsity']:.2%}",
                          f"[yellow]{row['fallback']} (too few tokens)[/yellow]" if row["fallback"] else method)
        console.print(table)
    console.print(f"layout: {result['loads_with']}", markup=False)
    if result.get("versions"):
        console.print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    evaluation = result.get("eval") or {}
    for e in evaluation.get("perplexity", []):
        console.print(f"eval: perplexity {e['ppl']:.3f} on {e['text']} (seqlen {e['seqlen']}, {e['windows']} windows)")
    for e in evaluation.get("divergence", []):
        console.print(f"eval: KL {e['kl']:.4f} nats/token, top-1 agreement {e['top1_agreement']:.2%} vs {e['baseline']}")
    for task, metrics in sorted(evaluation.get("tasks", {}).items()):
        console.print(f"eval: {task} " + ", ".join(f"{m} {metrics[m]:.4f}" for m in ("acc", "acc_norm") if m in metrics))
    if result.get("plot"):
        console.print(f"plot written to {result['plot']}")
