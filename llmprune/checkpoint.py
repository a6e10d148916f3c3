"""Save and load pruned model directories (safetensors + config + tokenizer + llmprune.json), atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from llmprune.errors import LlmpruneError

REPORT_FILE = "llmprune.json"


def check_output(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an existing output path unless overwrite; checked before any long work starts."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LlmpruneError(f"output path '{out}' already exists; choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise LlmpruneError(f"output path '{out}' is a file; choose a directory path for --out.")
    return out


def save_dense(model, tokenizer, out: str | os.PathLike, *, report: dict, overwrite: bool = False) -> Path:
    """Write the model (zeros where pruned) to `out`: built in a temporary sibling, renamed only when complete."""
    out = check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

