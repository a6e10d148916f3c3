"""`llmprune push`: upload a checkpoint to the Hugging Face Hub with a generated model card."""
from __future__ import annotations

from typing import Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune push m24 alice/smollm2-2of4

  llmprune push m24 alice/smollm2-2of4 --private --revision v1

The token comes from --token, HF_TOKEN or `hf auth login`; it is never printed or saved.
"""


@app.command(epilog=EXAMPLES)
@user_errors
def push(
    directory: str = typer.Argument(..., help="The model directory to upload."),
    repo_id: str = typer.Argument(..., help="Hub repository, owner/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, help="Branch to upload to (created if missing)."),
    token: Optional[str] = typer.Option(None, help="Hub token with write access (default: HF_TOKEN, then the cached login)."),
    json_output: bool = typer.Option(False, "--json", help="Print what was uploaded as JSON."),
    verbose: bool = VERBOSE,
):
    """Upload DIRECTORY to the Hub as REPO_ID, with a README.md model card (method, sparsity, eval, how to load)."""
    setup_logging(verbose, quiet=json_output)
    from llmprune.hub import push as run_push

    result = run_push(directory, repo_id, private=private, revision=revision, token=token)
    if json_output:
        print_json(result)
    else:
        typer.echo(f"uploaded {len(result['files'])} files to https://huggingface.co/{repo_id}"
                   + (f" (branch {result['revision']})" if result["revision"] else ""))
