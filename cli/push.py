"""`llmprune push`: upload a checkpoint to the Hugging Face Hub with a generated model card."""
from __future__ import annotations

from typing import Optional

import typer

from llmprune.cli.app import app
from llmprune.cli.common import VERBOSE, print_json, setup_logging, user_errors

EXAMPLES = """
Examples:

  llmprune push m24 alice/smollm2-2of4          # main: dense (loads anywhere); branch compressed: llmprune's layout

  llmprune push m24 alice/smollm2-2of4 --layout dense --private --revision v1

Load them back: llmprune.load("alice/smollm2-2of4") (main), llmprune.load("alice/smollm2-2of4@compressed"),
llmprune eval alice/smollm2-2of4@compressed, or, after `import llmprune`, transformers' from_pretrained with
revision="compressed". The token comes from --token, HF_TOKEN or `hf auth login`; it is never printed or saved.
"""


@app.command(epilog=EXAMPLES)
@user_errors
def push(
    directory: str = typer.Argument(..., help="The model directory to upload."),
    repo_id: str = typer.Argument(..., help="Hub repository, owner/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    layout: str = typer.Option("both", help="both (the dense layout to main, which plain transformers loads, and llmprune's compressed layout to --compressed-branch), dense, or compressed (to main: then only llmprune loads main)."),
    revision: Optional[str] = typer.Option(None, help="Branch for the dense layout (or, with --layout compressed, the compressed one); created if missing. [default: main]"),
    compressed_branch: str = typer.Option("compressed", help="Branch for the compressed layout with --layout both (created if missing)."),
    token: Optional[str] = typer.Option(None, help="Hub token with write access (default: HF_TOKEN, then the cached login)."),
    json_output: bool = typer.Option(False, "--json", help="Print what was uploaded as JSON."),
    verbose: bool = VERBOSE,
):
    """Upload DIRECTORY to the Hub as REPO_ID: by default its dense layout to main (loads with plain transformers) and
    its compressed layout to a branch, each with a README.md model card (method, sparsity, eval, which branch loads
    where and how)."""
    setup_logging(verbose, quiet=json_output)
    from llmprune.hub import push as run_push

    result = run_push(directory, repo_id, private=private, revision=revision, layout=layout,
                      compressed_branch=compressed_branch, token=token)
    if json_output:
        print_json(result)
    else:
        for upload in result["uploads"]:
            typer.echo(f"uploaded {len(upload['files'])} files ({upload['layout']} layout) to "
                       f"https://huggingface.co/{repo_id}/tree/{upload['revision']}")
