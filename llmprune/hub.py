"""`llmprune push`: upload a pruned checkpoint to the Hugging Face Hub with a generated model card.

The token comes from --token, then HF_TOKEN, then huggingface_hub's cached login; it is handed to
huggingface_hub only, never printed, logged or written anywhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path


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


LAYOUTS = ("both", "dense", "compressed")
COMPRESSED_BRANCH = "compressed"


def model_card(directory: str | Path, repo_id: str, info: dict, branches: list[dict] | None = None) -> str:
    """README.md: YAML metadata (base_model, tags, library), what was done and measured, and which branch of the
    repository holds which layout and loads with what. `branches`: [{"revision", "format", "layout", "info"}]."""
    from llmprune.checkpoint import read_report

    directory = Path(directory)
    report = read_report(directory)
    recipe = report.get("recipe") or {}
    base = base_model(report)
    tags = ["llmprune", "sparse", "pruned"] + ([recipe["method"]] if recipe.get("method") else []) + (
        ["compressed-tensors", recipe["quantize"]] if recipe.get("quantize", "none") != "none" else [])
    branches = branches or [{"revision": "main", "format": info["format"], "layout": _layout_of(info), "info": info}]
    main = next((b for b in branches if b["revision"] == "main"), branches[0])
    meta = ["---"]
    if base:
        meta.append(f"base_model: {base}")
    meta.append("library_name: " + ("transformers" if main["layout"] == "dense" or main["format"] == "pack-quantized"
                                     else "llmprune"))
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
    lines += ["## Which branch loads where", "", "| branch | layout | linear-layer weights | loads with |", "|---|---|---|---|"]
    for b in branches:
        sizes = b["info"]["sizes"]
        stored = f"{sizes['linear_stored_bytes'] / 2**20:.1f} MiB ({sizes['linear_ratio']:.3f}× dense)"
        spec = repo_id if b["revision"] == "main" else f"{repo_id}@{b['revision']}"
        if b["layout"] == "dense":
            loads = f"anything: plain transformers, vLLM, `llmprune.load(\"{spec}\")`"
            layout = "dense safetensors (zeros stored)"
        elif b["format"] == "pack-quantized":
            q = b["info"].get("quantization") or {}
            loads = (f"plain transformers with compressed-tensors (`pip install compressed-tensors`), vLLM, "
                     f"`llmprune.load(\"{spec}\")`")
            layout = f"compressed-tensors `pack-quantized` ({q.get('scheme', 'quantized')}, zeros kept as values)"
        elif b["layout"] == "llmprune":
            loads = (f"llmprune: `llmprune.load(\"{spec}\")`, or `import llmprune` and then transformers' "
                     "`from_pretrained`; without llmprune transformers stops with an error naming it")
            layout = f"llmprune's compressed `{b['format']}`"
        else:
            loads = f"`llmprune.load(\"{spec}\")`, or transformers 4 with compressed-tensors <= 0.14"
            layout = f"compressed-tensors 0.14 `{b['format']}`"
        lines.append(f"| `{b['revision']}` | {layout} | {stored} | {loads} |")
    lines.append("")
    lines += ["## Loading", "", "```python"]
    for b in branches:
        spec = repo_id if b["revision"] == "main" else f"{repo_id}@{b['revision']}"
        if b["layout"] == "dense" or b["format"] == "pack-quantized":
            lines += ["from transformers import AutoModelForCausalLM", "",
                      f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"'
                      + ("" if b["revision"] == "main" else f', revision="{b["revision"]}"') + ")   # no llmprune needed"
                      + ("; needs compressed-tensors" if b["format"] == "pack-quantized" else ""), ""]
        else:
            lines += ["import llmprune  # pip install llmprune: reads the compressed layout", "",
                      f'model, tokenizer = llmprune.load("{spec}")', ""]
    lines[-1:] = ["```", ""]
    return "\n".join(meta + [""] + lines)


def _layout_of(info: dict) -> str:
    return info.get("layout") or ("dense" if info["format"] == "dense" else "llmprune")


def push(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         layout: str = "both", compressed_branch: str = COMPRESSED_BRANCH, token: str | None = None, api=None) -> dict:
    """Create the repo if needed and upload the checkpoint, each layout in one commit with its model card.

    layout "both" (default): the dense layout to `revision` (main), which plain transformers loads, and llmprune's
    compressed layout to `compressed_branch`; "dense" or "compressed": that layout alone, to `revision`. The copies
    a layout needs are converted beside `directory` and removed afterwards. Returns what was sent where."""
    import tempfile

    from llmprune.describe import describe

    check_repo_id(repo_id)
    if layout not in LAYOUTS:
        raise LlmpruneError(f"unknown --layout '{layout}'; choose both (dense on main, compressed on a branch), dense or compressed.")
    directory = Path(directory)
    describe(directory)  # a directory that is no checkpoint fails here, before any conversion or upload
    target = revision or "main"
    if layout == "both" and compressed_branch == target:
        raise LlmpruneError(f"--compressed-branch '{compressed_branch}' is also where the dense layout goes; name another branch.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=resolve_token(token))
    wanted = {"both": [("dense", target), ("compressed", compressed_branch)], "dense": [("dense", target)],
              "compressed": [("compressed", target)]}[layout]
    if _quantized(directory):  # pack-quantized loads everywhere as it is: one upload, no converted copies
        if layout == "dense":
            raise LlmpruneError(f"{directory} is quantized (pack-quantized), which plain transformers and vLLM load as it "
                                "is; push it with --layout both or compressed, or convert it first: llmprune convert DIR "
                                "--format dense --out DENSE_DIR.")
        wanted = [("as-is", target)]
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.push-", dir=directory.parent) as work:
        copies = []
        for fmt, branch in wanted:
            path, info = _as_layout(directory, fmt, Path(work))
            if path is None:  # nothing pruned is worth compressing: no compressed branch
                continue
            copies.append({"revision": branch, "format": info["format"], "layout": _layout_of(info), "info": info, "path": path})
        uploads = []
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            for copy in copies:
                card = model_card(copy["path"], repo_id, copy["info"], branches=copies)
                operations = _operations(copy["path"], card)
                if copy["revision"] != "main":
                    api.create_branch(repo_id, branch=copy["revision"], exist_ok=True)
                commit = api.create_commit(repo_id, operations=operations, revision=copy["revision"], repo_type="model",
                                           commit_message=f"Upload {directory.name}, {copy['layout']} layout (llmprune)")
                uploads.append({"revision": copy["revision"], "layout": copy["layout"], "format": copy["format"],
                                "files": [op.path_in_repo for op in operations],
                                "url": getattr(commit, "commit_url", None) or str(commit)})
        except Exception as exc:  # huggingface_hub raises HTTP and network errors of many types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            done = f" ({', '.join(u['revision'] for u in uploads)} uploaded before it)" if uploads else ""
            raise LlmpruneError(f"upload to {repo_id} failed: {text}{done}; check the token's write access and your network.") from None
    return {"repo_id": repo_id, "private": private, "uploads": uploads}


def _quantized(directory: Path) -> bool:
    from llmprune import quant
    from llmprune.checkpoint import read_layout

    layout = read_layout(directory)
    return layout is not None and layout[1] == quant.PACK_FORMAT


def _as_layout(directory: Path, fmt: str, work: Path):
    """(a directory holding the checkpoint in `fmt` (dense or compressed: llmprune's layout), its description):
    `directory` itself where it is in that layout already, else a converted copy in `work`; (None, None) for a
    compressed layout of a checkpoint with nothing worth compressing."""
    from llmprune import formats
    from llmprune.checkpoint import convert, read_layout
    from llmprune.describe import describe

    layout = read_layout(directory)
    if fmt == "as-is" or (fmt == "dense" and layout is None) or (
            fmt == "compressed" and layout is not None and layout[0] == formats.LLMPRUNE):
        return directory, describe(directory)
    copy = work / fmt
    convert(directory, copy, fmt=fmt)
    if fmt == "compressed" and read_layout(copy) is None:
        return None, None
    return copy, describe(copy)


def _operations(directory: Path, card: str) -> list:
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p))
                  for p in files if p.name != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    return operations
