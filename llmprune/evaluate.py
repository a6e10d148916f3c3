"""Perplexity by the SparseGPT protocol, and divergence from a baseline model on the same windows.

Zero-shot accuracy goes through lm-eval (EleutherAI's harness) on the model already in memory: it does
all task loading and scoring; we wrap the model in its `HFLM`, check task names before anything runs and
turn its failures into one-line errors. lm-eval is imported lazily: `llmprune prune` never pays for it.

Perplexity protocol (SparseGPT's `eval` utilities): the text is tokenized once, cut into non-overlapping windows of
`seqlen` tokens, each window's loss is the mean next-token cross-entropy over its seqlen - 1 predictions,
and ppl = exp(mean window loss).
"""
from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llmprune.errors import LlmpruneError


def windows_of(tokens: Tensor, *, seqlen: int, max_windows: int | None = None, start: int = 0) -> Tensor:
    """[windows, seqlen] non-overlapping windows of the stream tokens[0, start:]."""
    stream = tokens[0, start:]
    count = stream.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise LlmpruneError(
            f"the evaluation text has {stream.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
            "use a smaller --seqlen or a longer text."
        )
    return stream[: count * seqlen].reshape(count, seqlen)


def _logits(model, batch: Tensor) -> Tensor:
    return model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [b, seqlen-1, vocab]


def perplexity(model, tokens: Tensor, *, seqlen: int, max_windows: int | None = None, start: int = 0,
               batch_size: int = 1, device: torch.device | str = "cpu", baseline=None, desc: str = "perplexity") -> dict:
    """Perplexity of `model` on tokens [1, n]: windows of `seqlen` from token `start` on, at most `max_windows`.

    With a `baseline` model (same tokenizer) on the same device, the same pass also gives the baseline's
    perplexity, the mean KL divergence KL(baseline ‖ model) of the next-token distributions (nats per
    token) and the share of positions where both models' most likely next token agree.
    """
    ids = windows_of(tokens, seqlen=seqlen, max_windows=max_windows, start=start)
    from tqdm.auto import tqdm

    losses, base_losses, kls, agree = [], [], [], []
    with torch.no_grad():
        for batch in tqdm(ids.split(batch_size), desc=desc, unit="batch", disable=None, leave=False):
            batch = batch.to(device)
            targets = batch[:, 1:]
            logits = _logits(model, batch)
            losses.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1).double().cpu())
            if baseline is None:
                continue
            base = _logits(baseline, batch)
            if base.shape[-1] != logits.shape[-1]:
                raise LlmpruneError(
                    f"the baseline predicts over {base.shape[-1]} tokens and the model over {logits.shape[-1]}; "
                    "compare models that share a vocabulary."
                )
            base_losses.append(F.cross_entropy(base.transpose(1, 2), targets, reduction="none").mean(dim=1).double().cpu())
            log_p, log_q = F.log_softmax(base, dim=-1), F.log_softmax(logits, dim=-1)
            kls.append(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).flatten().double().cpu())
            agree.append((base.argmax(-1) == logits.argmax(-1)).flatten().cpu())
    mean_loss = torch.cat(losses).mean().item()
    result = {"ppl": math.exp(mean_loss), "mean_loss": mean_loss, "seqlen": seqlen, "windows": ids.shape[0], "start": start}
    if baseline is not None:
        base_loss = torch.cat(base_losses).mean().item()
        result.update(baseline_ppl=math.exp(base_loss), kl=torch.cat(kls).mean().item(),
                      top1_agreement=torch.cat(agree).float().mean().item())
    return result


# ---- zero-shot tasks through lm-eval ------------------------------------------------------------------

log = logging.getLogger(__name__)

# The zero-shot set the SparseGPT and Wanda papers report (Wanda, Table 2 and its appendix tables).
ZEROSHOT = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")  # Wanda reports acc for every task; acc_norm is shown where lm-eval gives it


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LlmpruneError("zero-shot tasks need lm-eval; run: pip install 'llmprune[eval]'.") from None
    return lm_eval, TaskManager


def parse_tasks(spec: str | None) -> list[str]:
    """'zeroshot' (the papers' set), comma-separated lm-eval task names, or both ('zeroshot,piqa')."""
    if not spec:
        return []
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        for name in ZEROSHOT if part == "zeroshot" else (part,):
            if name not in names:
                names.append(name)
    if not names:
        raise LlmpruneError(f"--tasks '{spec}' names no task; pass lm-eval task names or 'zeroshot', comma-separated.")
    return names


def task_manager(tasks: list[str], tasks_dir: str | Path | None = None):
    """lm-eval's TaskManager (with tasks_dir's YAML first), after checking every name exists."""
    _, TaskManager = _lm_eval()
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise LlmpruneError(f"--tasks-dir '{tasks_dir}' is not a directory; point it at a folder of lm-eval task YAML files.")
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm_eval ls tasks` for the names."
            raise LlmpruneError(f"unknown lm-eval task '{name}'; {hint}")
    return manager


def evaluate_tasks(model, tokenizer, tasks: list[str], *, manager=None, tasks_dir: str | Path | None = None,
                   limit: int | None = None, batch_size: int = 1, num_fewshot: int | None = None) -> dict:
    """Run lm-eval on the in-memory model; returns {"tasks": {task: {metric: value, ...}}, "lm_eval": version}."""
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(tasks, tasks_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0)
    except FileNotFoundError as exc:  # a local task's data file (eval/tasks/*) is missing
        raise LlmpruneError(f"a task's data file is missing: {_first_line(exc)}.") from None
    except Exception as exc:  # task loading fails with datasets' and hub's many exception types
        if _is_offline_failure(exc):
            raise LlmpruneError(
                f"a task's data could not be downloaded ({_first_line(exc)}); run online once so the Hugging Face "
                "cache holds it, or pass --tasks-dir with task YAML that reads local files (see eval/tasks/)."
            ) from None
        raise
    results = {}
    for task in out["results"]:
        metrics = out["results"][task]
        entry = {}
        for metric in METRICS:
            if f"{metric},none" in metrics:
                entry[metric] = metrics[f"{metric},none"]
        entry["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
        entry["version"] = out.get("versions", {}).get(task)
        entry["num_fewshot"] = out.get("n-shot", {}).get(task)
        results[task] = entry
    return {"tasks": results, "lm_eval": _version(), "limit": limit}


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_offline_failure(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                         "MaxRetryError", "NameResolutionError", "ConnectTimeout", "HfHubHTTPError"}) or any(
        s in text for s in ("couldn't reach", "offline", "connection", "name resolution", "failed to resolve"))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
