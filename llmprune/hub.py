"""`llmprune push`: upload a pruned checkpoint to the Hugging Face Hub with a generated model card.

The token comes from --token, then HF_TOKEN, then huggingface_hub's cached login; it is handed to
huggingface_hub only, never printed, logged or written anywhere.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llmprune.checkpoint import REPORT_FILE
from llmprune.errors import LlmpruneError

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
ALIAS_BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.fullmatch(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise LlmpruneError(f"'{repo_id}' is not a Hub repository id; use owner/name, e.g. alice/smollm2-2of4.")
    return repo_id


def resolve_token(token: str | None) -> str:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token

        cached = get_token()
    except Exception:  # an unreadable token file is the same as none
        cached = None
    if not cached:
        raise LlmpruneError("no Hugging Face token found; log in with `hf auth login`, set HF_TOKEN, or pass --token.")
    return cached


def base_model(report: dict) -> str | None:
    spec = ((report.get("model") or {}).get("spec")) or ""
    if spec in ALIAS_BASES:
        return ALIAS_BASES[spec]
    if REPO_ID.fullmatch(spec) and not Path(spec).exists():
        return spec
    return None


def model_card(directory: str | Path, repo_id: str, info: dict) -> str:
    """README.md: YAML metadata (base_model, tags, library) and what was done, measured and how to load it."""
    directory = Path(directory)
    report_path = directory / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    recipe = report.get("recipe") or {}
    base = base_model(report)
    fmt = info["format"]
    tags = ["llmprune", "sparse", "pruned"] + ([recipe["method"]] if recipe.get("method") else [])
    meta = ["---"]
    if base:
        meta.append(f"base_model: {base}")
    meta.append("library_name: " + ("transformers" if fmt == "dense" else "llmprune"))
    meta.append("tags:")
    meta += [f"- {t}" for t in tags]
    meta.append("---")

    lines = [f"# {repo_id.split('/')[-1]}", ""]
    what = f"{recipe.get('method', 'pruned')}" + (f", {recipe['pattern']}" if recipe.get("pattern") else "")
    lines.append(f"{base or 'A model'} pruned with [llmprune](https://pypi.org/project/llmprune/) ({what}); "
                 f"{info['sparsity']:.1%} of its linear-layer weights are zero.")
    lines.append("")
    lines += ["| | |", "|---|---|"]
    if recipe:
        lines.append(f"| method | {recipe.get('method')} |")
        lines.append(f"| sparsity | {recipe.get('sparsity')} ({recipe.get('pattern')}) |")
        lines.append(f"| calibration | {recipe.get('nsamples')} × {report.get('seqlen_used', recipe.get('seqlen'))} tokens of "
                     f"{recipe.get('calibration')}, seed {recipe.get('seed')} |")
        lines.append(f"| schedule | {'sequential' if recipe.get('sequential', True) else 'two-pass'} |")
    sizes = info["sizes"]
    lines.append(f"| format | {fmt} |")
    lines.append(f"| linear-layer bytes | {sizes['linear_stored_bytes'] / 2**20:.1f} MiB stored vs "
                 f"{sizes['linear_dense_bytes'] / 2**20:.1f} MiB dense ({sizes['linear_ratio']:.3f}×) |")
    lines.append("")
    evaluation = report.get("eval") or {}
    if evaluation.get("perplexity") or evaluation.get("tasks"):
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        for e in evaluation.get("perplexity", []):
            lines.append(f"| perplexity ({e['text']}, seqlen {e['seqlen']}, {e['windows']} windows) | {e['ppl']:.3f} |")
        for e in evaluation.get("divergence", []):
            lines.append(f"| KL from {e['baseline']} (nats/token, seqlen {e['seqlen']}) | {e['kl']:.4f} |")
            lines.append(f"| top-1 agreement with {e['baseline']} | {e['top1_agreement']:.2%} |")
        for task, metrics in sorted(evaluation.get("tasks", {}).items()):
            for metric in ("acc", "acc_norm"):
                if metric in metrics:
                    lines.append(f"| {task} {metric} | {metrics[metric]:.4f} |")
        lines.append("")
    lines += ["## Loading", "", "```python", "import llmprune", "", f'model, tokenizer = llmprune.load("{repo_id}")', "```", ""]
    if fmt != "dense":
        lines += [f"The weights are stored in compressed-tensors' `{fmt}` layout; `llmprune.load` decompresses them "
                  "into a plain transformers model. `llmprune convert DIR --format dense` writes a dense copy.", ""]
    else:
        lines += ["The weights are dense safetensors (zeros where pruned); plain "
                  "`transformers.AutoModelForCausalLM.from_pretrained` loads them too.", ""]
    return "\n".join(meta + [""] + lines)


def push(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, api=None) -> dict:
    """Create the repo if needed and upload the directory plus README.md in one commit; returns what was sent."""
    from llmprune.checkpoint import describe

    check_repo_id(repo_id)
    directory = Path(directory)
    info = describe(directory)
    card = model_card(directory, repo_id, info)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=resolve_token(token))
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in directory.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p))
                  for p in files if p.name != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, revision=revision, repo_type="model",
                                   commit_message=f"Upload {directory.name} (llmprune)")
    except Exception as exc:  # huggingface_hub raises HTTP and network errors of many types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmpruneError(f"upload to {repo_id} failed: {text}; check the token's write access and your network.") from None
    return {"repo_id": repo_id, "revision": revision, "private": private,
            "files": [op.path_in_repo for op in operations], "url": getattr(commit, "commit_url", None) or str(commit)}
