"""`llmprune eval`: perplexity by the SparseGPT protocol."""
from __future__ import annotations

from typing import Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune eval smollm2-sparsegpt-24 --ppl wikitext2

  llmprune eval smollm2 --ppl ./valid.txt --seqlen 512 --max-windows 64 --json
"""


@app.command("eval", epilog=EXAMPLES)
@user_errors
def eval_command(
    model: Optional[str] = typer.Argument(None, help="Pruned directory, Hub id, .gguf file or 'smollm2'."),
    ppl: str = typer.Option("wikitext2", help="wikitext2 (test split, Hub), c4 (validation, Hub), wikitext2-valid (bundled) or PATH.txt / PATH.jsonl."),
    seqlen: int = typer.Option(2048, help="Tokens per window (capped at the model's max positions)."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    start: int = typer.Option(0, help="First token of the stream to use (to hold out calibration text)."),
    batch_size: int = typer.Option(1, help="Windows per forward call."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Perplexity of MODEL: the text tokenized once, non-overlapping windows, ppl = exp(mean window loss)."""
    setup_logging(verbose, quiet=json_output)
    from llmprune import models
    from llmprune.api import resolve_device
    from llmprune.data import eval_tokens
    from llmprune.evaluate import perplexity

    if batch_size < 1:
        from llmprune.errors import LlmpruneError

        raise LlmpruneError(f"--batch-size must be at least 1; got {batch_size}.")
    compute = resolve_device(device)
    model_obj, tokenizer, _ = models.load_model(model, dtype=None if dtype == "auto" else dtype)
    limit = models.max_positions(model_obj)
    if limit is not None and seqlen > limit:
        typer.echo(f"note: --seqlen {seqlen} exceeds the model's max positions; using {limit}", err=True)
        seqlen = limit
    model_obj.to(compute)
    result = perplexity(model_obj, eval_tokens(ppl, tokenizer, seqlen=seqlen), seqlen=seqlen, max_windows=max_windows,
                        start=start, batch_size=batch_size, device=compute)
    result = {"model": model or "smollm2", "text": ppl, **result}
    if json_output:
        print_json(result)
    else:
        typer.echo(f"{result['model']}: perplexity {result['ppl']:.4f} on {ppl} "
                   f"({result['windows']} windows × {seqlen} tokens, from token {start})")
