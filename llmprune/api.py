"""prune(): load → calibration data → calibrate → save. The library form of `llmprune prune`."""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from llmprune import calibrate, checkpoint, data, models
from llmprune.errors import LlmpruneError
from llmprune.recipe import Recipe
from llmprune.solvers import needs_data

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise LlmpruneError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LlmpruneError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu.")
    return resolved


def versions() -> dict:
    import transformers

    from llmprune import __version__

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def prune(
    model_or_path: str | nn.Module | None = None,
    *,
    recipe: Recipe | None = None,
    tokenizer=None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = "auto",
    dtype: str | None = None,
    microbatch: int | None = None,
    **recipe_fields,
):
    """Prune a model; returns (model, report). Writes the dense checkpoint to `out` when given.

    model_or_path: Hub id, local directory, .gguf file, the alias 'smollm2' (default), or a loaded
    model (then pass its tokenizer for calibration). Recipe fields (method, sparsity, pattern,
    calibration, nsamples, seqlen, seed, ignore, sequential) may be passed directly instead of `recipe`.

    >>> model, report = prune("smollm2", method="wanda", sparsity=0.5, calibration="wikitext2-valid",
    ...                       nsamples=16, seqlen=256)                                # doctest: +SKIP
    """
    started = time.perf_counter()
    if recipe is None:
        recipe = Recipe.create(**recipe_fields)
    elif recipe_fields:
        raise TypeError(f"pass either recipe= or recipe fields, not both: {sorted(recipe_fields)}")
    target = checkpoint.check_output(out, overwrite=overwrite) if out is not None else None
    compute = resolve_device(device)

    timings = {}
    if isinstance(model_or_path, nn.Module):
        model, source = model_or_path, {"spec": type(model_or_path).__name__, "kind": "module"}
        if dtype is not None:
            model.to(models.parse_dtype(dtype))
    else:
        model, tokenizer, src = models.load_model(model_or_path, dtype=dtype)
        source = asdict(src)
    timings["load_s"] = time.perf_counter() - started

    seqlen = recipe.seqlen
    limit = models.max_positions(model)
    notes = []
    if limit is not None and seqlen > limit:
        notes.append(f"seqlen {seqlen} capped to the model's max positions {limit}")
        log.warning("--seqlen %d exceeds the model's max positions; using %d", seqlen, limit)
        seqlen = limit

    windows = None
    if needs_data(recipe.method):
        if tokenizer is None:
            raise LlmpruneError(f"method {recipe.method} needs calibration text, so pass the model's tokenizer too.")
        t0 = time.perf_counter()
        windows = data.calibration_windows(recipe.calibration, tokenizer, nsamples=recipe.nsamples,
                                           seqlen=seqlen, seed=recipe.seed)
        timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = calibrate.prune_model(
        model, windows, method=recipe.method, sparsity=recipe.sparsity, pattern=recipe.parsed_pattern,
        ignore=recipe.ignore, sequential=recipe.sequential, microbatch=microbatch, device=compute,
    )
    timings["prune_s"] = time.perf_counter() - t0

    total = sum(r.shape[0] * r.shape[1] for r in results)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in results)
    report = {
        "recipe": recipe.to_dict(),
        "seqlen_used": seqlen,
        "notes": notes,
        "model": source,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(compute),
        "sparsity": zeros / total,
        "linears": [asdict(r) for r in results],
        "timings": timings,
        "versions": versions(),
    }
    if target is not None:
        t0 = time.perf_counter()
        report["output"] = str(target)
        checkpoint.save_dense(model, tokenizer, target, report=report, overwrite=overwrite)
        timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    return model, report
