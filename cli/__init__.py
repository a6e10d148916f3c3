"""The `llmprune` command line: thin typer commands over the library."""
from llmprune.cli.app import app, main

__all__ = ["app", "main"]
