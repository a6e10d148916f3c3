"""`llmprune convert`: between the dense and the sparse layouts, atomically."""
from __future__ import annotations

import typer

from llmprune.cli.app import app
from llmprune.cli.common import ALLOW_PICKLE, OVERWRITE, TRUST_REMOTE_CODE, VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune convert m24 --format dense --out m24-dense          # for tools that need dense weights

  llmprune convert ./sparse-dense-zeros --format compressed --out ./sparse-small

  llmprune convert m24 --format compressed-tensors --out m24-ct014   # for compressed-tensors <= 0.14 users
"""


@app.command(epilog=EXAMPLES)
@user_errors
def convert(
    directory: str = typer.Argument(..., help="A model directory (dense or compressed)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (written only when complete)."),
    format: str = typer.Option(..., "--format", help="dense (loads anywhere), compressed (llmprune's sparse layout) or compressed-tensors (0.14's exact layout)."),
    overwrite: bool = OVERWRITE,
    allow_pickle: bool = ALLOW_PICKLE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    verbose: bool = VERBOSE,
):
    """Rewrite a checkpoint as dense safetensors or in a sparse layout (the weights stay bit-identical)."""
    setup_logging(verbose, quiet=json_output)
    from llmprune.checkpoint import convert as run_convert

    result = run_convert(directory, out, fmt=format, overwrite=overwrite, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
    if json_output:
        print_json(result)
    else:
        typer.echo(f"{result['source']} → {result['output']} ({result['format']}, "
                   f"{result['bytes'] / 2**20:.1f} MiB of weights)")
