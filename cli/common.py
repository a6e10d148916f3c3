"""What every command shares: logging, the one place that turns LlmpruneError into exit code 2, JSON output."""
from __future__ import annotations

import errno
import functools
import json
import logging
import sys

import typer

from llmprune.errors import LlmpruneError


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
    root = logging.getLogger("llmprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("transformers", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if not verbose:
        transformers.utils.logging.disable_progress_bar()


# Options every command that loads a model shares (one definition, one help text).
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow loading pickle (.bin) weights, which can run code.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code from the Hub to run.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --out directory.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Debug logging.")


def fail(message: str) -> "typer.Exit":
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


_FILE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST,
                errno.ENAMETOOLONG, errno.EDQUOT, errno.ELOOP}


def user_errors(func):
    """Turn LlmpruneError (and Ctrl-C) into one line on stderr and exit code 2; other exceptions are bugs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LlmpruneError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was written (partial output removed).") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise fail(f"no space left on the device{f' writing {exc.filename}' if exc.filename else ''}; nothing was "
                           "finished (partial output removed): free some space or write --out elsewhere.") from None
            if exc.errno in _FILE_ERRORS and exc.filename:  # a place that cannot be read or written, found late
                raise fail(f"could not use '{exc.filename}' ({exc.strerror}); nothing was finished (partial output "
                           "removed): check the path and its permissions.") from None
            raise

    return wrapper


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
