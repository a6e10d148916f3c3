"""`llmprune eval`: perplexity, divergence from a dense baseline and lm-eval zero-shot accuracy, side by side."""
from __future__ import annotations

from typing import List, Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import ALLOW_PICKLE, TRUST_REMOTE_CODE, VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune eval smollm2-sparsegpt-24 --baseline smollm2 --ppl wikitext2 --tasks zeroshot

  llmprune eval A B C --ppl ./valid.txt --seqlen 512 --max-windows 64 --tasks arc_easy,piqa --json > results.json

  llmprune eval m24 --baseline smollm2 --tasks wikitext_mc --tasks-dir eval/tasks --limit 200   # offline

--tasks zeroshot is the set the SparseGPT and Wanda papers report: boolq, rte, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa. Perplexity follows SparseGPT's protocol (text tokenized once,
non-overlapping windows, ppl = exp(mean window loss)); the seqlen and window count are always reported.
"""


@app.command("eval", epilog=EXAMPLES)
@user_errors
def eval_command(
    models: Optional[List[str]] = typer.Argument(None, help="Pruned directories, Hub ids, .gguf files or 'smollm2' (default)."),
    baseline: Optional[str] = typer.Option(None, help="Dense model to compare against: its own numbers, plus KL divergence and top-1 agreement of each model's next-token distribution from it."),
    ppl: Optional[str] = typer.Option(None, help="Perplexity text: wikitext2 (test split, Hub), c4 (validation, 256 windows, Hub), wikitext2-valid (bundled) or PATH.txt / PATH.jsonl; 'none' to skip. Default: wikitext2, or none when --tasks is given."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per window. Default 2048 (capped at the model's max positions)."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    start: int = typer.Option(0, help="First token of the stream to use (to hold out calibration text)."),
    tasks: Optional[str] = typer.Option(None, help="lm-eval tasks, comma-separated: 'zeroshot' (the papers' set) and/or task names."),
    limit: Optional[int] = typer.Option(None, help="At most this many examples per task."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per task (default: the task's own, 0 for the zeroshot set)."),
    tasks_dir: Optional[str] = typer.Option(None, help="Folder of lm-eval task YAML (e.g. eval/tasks) searched before the built-in tasks; for offline data."),
    batch_size: int = typer.Option(1, help="Windows per forward call, and lm-eval's batch size."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = typer.Option(False, "--json", help="Print every number as JSON on stdout."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not write the results into each llmprune output's llmprune.json."),
    verbose: bool = VERBOSE,
):
    """How much did pruning cost? Perplexity, divergence from the dense model and zero-shot accuracy."""
    setup_logging(verbose, quiet=json_output)
    from llmprune.api import evaluate

    if ppl is None:
        ppl = None if tasks else "wikitext2"
    elif ppl.lower() == "none":
        ppl = None
    if ppl is None and not tasks:
        from llmprune.errors import LlmpruneError

        raise LlmpruneError("nothing to evaluate: --ppl none and no --tasks; give a perplexity text or tasks.")
    result = evaluate(models or [None], baseline=baseline, ppl=ppl, seqlen=seqlen, max_windows=max_windows,
                      start=start, batch_size=batch_size, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                      tasks_dir=tasks_dir, device=device, dtype=None if dtype == "auto" else dtype,
                      record=not no_record, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if json_output:
        print_json(result)
    else:
        render(result)


def _delta(value: float, base: float | None, *, relative: bool) -> str:
    if base is None:
        return ""
    if relative:
        return f" ({(value / base - 1):+.1%})" if base else ""
    return f" ({value - base:+.3f})"


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    entries = result["models"]
    base = entries[0] if entries and entries[0]["role"] == "baseline" else None
    table = Table(title="llmprune eval")
    table.add_column("metric")
    for e in entries:
        table.add_column(e["model"] + (" (baseline)" if e["role"] == "baseline" else ""), justify="right")

    def row(label: str, key: str, fmt: str, *, relative: bool = False, baseline_too: bool = True):
        cells = []
        for e in entries:
            value = e.get(key)
            if value is None or (e is base and not baseline_too):
                cells.append("—")
                continue
            ref = base.get(key) if base is not None and e is not base else None
            cells.append(format(value, fmt) + _delta(value, ref, relative=relative))
        table.add_row(label, *cells)

    if result.get("text"):
        row(f"perplexity ({result['text']}, seqlen {result['seqlen']}, {result['windows']} windows)", "ppl", ".3f",
            relative=True)
        if base is not None:
            row("KL from baseline (nats/token)", "kl", ".4f", baseline_too=False)
            row("top-1 agreement with baseline", "top1_agreement", ".2%", baseline_too=False)
    for task in result.get("tasks") or []:
        metrics = []
        for e in entries:
            metrics += [m for m in e.get("tasks", {}).get(task, {}) if m in ("acc", "acc_norm") and m not in metrics]
        for metric in metrics:
            cells = []
            for e in entries:
                value = e.get("tasks", {}).get(task, {}).get(metric)
                ref = base.get("tasks", {}).get(task, {}).get(metric) if base is not None and e is not base else None
                cells.append("—" if value is None else f"{value:.4f}" + _delta(value, ref, relative=False))
            table.add_row(f"{task} {metric}", *cells)
    console = Console()
    console.print(table)
    notes = []
    if result.get("tasks"):
        samples = {e.get("tasks", {}).get(t, {}).get("samples") for e in entries for t in result["tasks"]} - {None}
        notes.append(f"lm-eval {result.get('lm_eval', '?')}, {'limit ' + str(result['limit']) if result.get('limit') else 'full tasks'}"
                     + (f", {min(samples)}–{max(samples)} examples per task" if samples else ""))
    recorded = [e["recorded_in"] for e in entries if e.get("recorded_in")]
    if recorded:
        notes.append("recorded in " + ", ".join(recorded))
    for note in notes:
        console.print(note)
