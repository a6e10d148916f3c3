"""Load checkpoints with plain transformers, in an environment of its own: what a user without llmprune gets.

Run with `python -S` and PYTHONPATH=ENV:SITE_PACKAGES, where ENV holds the transformers (and compressed-tensors)
under test, installed apart with `pip install --target ENV`: -S skips the site-packages' .pth files, so llmprune's
editable install is not importable. --with-llmprune REPO puts llmprune's source on the path and imports it first,
as a user with llmprune installed would.

    python -S eval/plain_load.py [--with-llmprune REPO] [--tokens 1,2,3] DIR [DIR ...]

One JSON line per directory: whether it loaded, the error's first lines where it did not, the sha256 of every
weight (state_dict order) and the logits of the tokens, plus the versions in use.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys


def digest(tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bfloat16 included)."""
    import torch

    return hashlib.sha256(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+")
    parser.add_argument("--with-llmprune", metavar="REPO", help="import llmprune from this source tree first")
    parser.add_argument("--tokens", default="3,1,4,1,5,9,2,6")
    args = parser.parse_args()
    if args.with_llmprune:
        sys.path.insert(0, args.with_llmprune)
        import llmprune  # noqa: F401  (registers its loader with transformers)
    elif importlib.util.find_spec("llmprune") is not None:
        raise SystemExit("llmprune is importable here; run with python -S and PYTHONPATH=ENV:SITE_PACKAGES")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    try:
        import compressed_tensors
        ct_version = compressed_tensors.__version__
    except ImportError:
        ct_version = None
    ids = torch.tensor([[int(t) for t in args.tokens.split(",")]])
    for directory in args.directories:
        row = {"directory": directory, "transformers": transformers.__version__, "compressed_tensors": ct_version,
               "llmprune": bool(args.with_llmprune)}
        try:
            model = AutoModelForCausalLM.from_pretrained(directory)
        except Exception as exc:  # what the user sees is the point
            row.update(loaded=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        else:
            with torch.no_grad():
                logits = model(ids).logits.float()
            row.update(loaded=True, weights={k: digest(v) for k, v in model.state_dict().items()},
                       logits=logits.flatten().tolist())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
