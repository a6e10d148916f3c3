"""The typer application: one small module per command."""
from __future__ import annotations

import typer

from llmprune.version import __version__

app = typer.Typer(
    name="llmprune",
    help="One-shot pruning of decoder LLMs: SparseGPT, Wanda and magnitude, unstructured or N:M.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"llmprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


from llmprune.cli import bench as _bench  # noqa: E402,F401  (registers the command)
from llmprune.cli import convert as _convert  # noqa: E402,F401
from llmprune.cli import eval as _eval  # noqa: E402,F401
from llmprune.cli import info as _info  # noqa: E402,F401
from llmprune.cli import prune as _prune  # noqa: E402,F401
from llmprune.cli import push as _push  # noqa: E402,F401


def main() -> None:
    app()
