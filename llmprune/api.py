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
from llmprune.recipe import RECIPE_FILE, Recipe
from llmprune.solvers import needs_data

log = logging.getLogger(__name__)

DEFAULT_EVAL_SEQLEN = 2048  # SparseGPT's and DSnoT's evaluation window (Wanda's LLaMA-2 numbers use 4096)


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
    format: str = "compressed",
    resume: bool = False,
    stream: bool | None = None,
    offload_activations: str | os.PathLike | None = None,
    checkpoint_every: float | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    **recipe_fields,
):
    """Prune a model; returns (model, report), the model None when it was streamed. Writes the checkpoint to `out`.

    model_or_path: Hub id, local directory, .gguf file, the alias 'smollm2' (default), or a loaded
    model (then pass its tokenizer for calibration). format: 'compressed' (compressed-tensors sparse
    layout, the default) or 'dense' (zeros stored; loads with plain transformers). Recipe fields (method, sparsity, pattern,
    calibration, nsamples, seqlen, seed, ignore, sequential) may be passed directly instead of `recipe`.
    With `out`, the run's state lives in OUT.partial/ until OUT/ is complete; resume=True continues it.
    stream: read one decoder block at a time from the safetensors shards (None: when the model would not fit
    in half the free memory). offload_activations: a directory for the calibration activations (chosen in
    OUT.partial/ when they would not fit in memory). checkpoint_every: least seconds between two saves of the
    partial run's state (default 60; 0 saves after every block). Under torchrun, the calibration data and the solves are
    shared by the processes.

    >>> model, report = prune("smollm2", method="wanda", sparsity=0.5, calibration="wikitext2-valid",
    ...                       nsamples=16, seqlen=256)                                # doctest: +SKIP
    """
    from llmprune import distributed, streaming

    started = time.perf_counter()
    if recipe is None:
        recipe = Recipe.create(**recipe_fields)
    elif recipe_fields:
        raise TypeError(f"pass either recipe= or recipe fields, not both: {sorted(recipe_fields)}")
    checkpoint.check_format(format)
    if out is None and (resume or stream):
        raise LlmpruneError(f"{'--resume' if resume else '--stream'} needs --out: the finished blocks are kept beside it.")
    compute = resolve_device(device)
    dist = distributed.from_environment(compute)
    compute = distributed.local_device(compute)
    target = checkpoint.check_output(out, overwrite=overwrite) if out is not None else None
    partial, progress = _leftover_run(out, resume)
    dist.barrier()  # every rank has looked before rank 0 may create OUT.partial

    timings = {}
    model, tokenizer, source, shards = _load(model_or_path, tokenizer, stream=stream, dtype=dtype, dist=dist,
                                             allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    timings["load_s"] = time.perf_counter() - started

    seqlen = recipe.seqlen
    limit = models.max_positions(model)
    notes = []
    if limit is not None and seqlen > limit:
        notes.append(f"seqlen {seqlen} capped to the model's max positions {limit}")
        log.warning("--seqlen %d exceeds the model's max positions; using %d", seqlen, limit)
        seqlen = limit

    refine = recipe.dsnot
    windows = None
    data_needed = needs_data(recipe.method, refine)
    if data_needed or recipe.allocation == "owl":
        if tokenizer is None:
            raise LlmpruneError(f"this recipe ({recipe.method}, {recipe.allocation}, refine {recipe.refine}) needs calibration text, "
                                "so pass the model's tokenizer too.")
        t0 = time.perf_counter()
        windows = data.calibration_windows(recipe.calibration, tokenizer, nsamples=recipe.nsamples,
                                           seqlen=seqlen, seed=recipe.seed)
        timings["data_s"] = time.perf_counter() - t0

    model_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    offload, sequential = _place_activations(offload_activations, windows, model, partial, dist, compute,
                                             recipe.sequential)
    if offload is None and sequential != recipe.sequential:
        notes.append("two-pass schedule: the sequential one would not fit the calibration activations in memory")
    run = None
    if target is not None:
        options = {"model": source["spec"], "recipe": recipe.to_dict(), "seqlen": seqlen, "dtype": model_dtype,
                   "microbatch": microbatch or (calibrate.default_microbatch(seqlen) if windows is not None else None),
                   "processes": dist.world, "two_pass": not sequential or offload is not None}
        run = streaming.PartialRun(partial, model, options=options, dist=dist, source=shards,
                                   every=streaming.CHECKPOINT_SECONDS if checkpoint_every is None else checkpoint_every)
    try:
        start, inputs, allocated = 0, None, None
        if progress is not None:
            inputs = run.resume(progress, needs_inputs=data_needed)
            start, allocated, notes = run.done_blocks, run.extra.get("allocation"), run.extra.get("notes", notes)
            log.info("resuming %s after block %d of %d", partial, start, run.total)
        if recipe.allocation == "owl" and allocated is None:
            t0 = time.perf_counter()
            allocated = _owl(model, windows, recipe, microbatch, compute, run, dist, offload)
            timings["allocation_s"] = time.perf_counter() - t0
        sparsity_of = _sparsity_of(model, recipe, allocated["block_sparsity"] if allocated else None)
        if run is not None and progress is None:
            run.start({"allocation": allocated, "notes": notes})

        t0 = time.perf_counter()
        results = calibrate.prune_model(
            model, windows, method=recipe.method, sparsity=sparsity_of, pattern=recipe.parsed_pattern,
            ignore=recipe.ignore, targets=recipe.targets, sequential=sequential, microbatch=microbatch,
            device=compute, refine=refine, store=run, start=start, inputs=inputs, dist=dist, offload=offload,
        ) if run is None or start < run.total else []
        timings["prune_s"] = time.perf_counter() - t0
        _clean_offload(offload, asked=offload_activations is not None, dist=dist)
    except BaseException as exc:
        _clean_offload(offload, asked=offload_activations is not None, dist=dist)
        if run is not None and progress is None and run.saved_blocks == 0:
            run.remove()  # nothing worth resuming
        elif run is not None and isinstance(exc, KeyboardInterrupt):
            saved = "" if run.saved_blocks == run.done_blocks else f" (the last save holds {run.saved_blocks})"
            raise LlmpruneError(f"interrupted after {run.done_blocks} of {run.total} blocks{saved}; continue with --resume "
                                f"(the finished blocks are kept in {partial}).") from None
        raise

    linears = run.results if run is not None else [asdict(r) for r in results]
    total = sum(r["shape"][0] * r["shape"][1] for r in linears)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in linears)
    report = {
        "recipe": recipe.to_dict(),
        "seqlen_used": seqlen,
        "notes": notes,
        "model": source,
        "model_class": type(model).__name__,
        "dtype": model_dtype,
        "device": str(compute),
        "processes": dist.world,
        "sparsity": zeros / total,
        "allocation": allocated,
        "linears": linears,
        "timings": timings,
        "versions": versions(),
    }
    if progress is not None:
        report["resumed_after_block"] = start
    if target is not None:
        t0 = time.perf_counter()
        report["output"] = str(target)
        files = {RECIPE_FILE: recipe.to_yaml("the recipe this checkpoint was pruned with; "
                                             "`llmprune prune MODEL --recipe recipe.yaml` reproduces its masks")}
        pruned = {r["name"] for r in linears if r["sparsity"] > 0}
        if dist.main:
            try:
                if shards is not None:
                    run.assemble(target, tokenizer=tokenizer, fmt=format, targets=pruned, report=report, files=files,
                                 overwrite=overwrite)
                else:
                    checkpoint.save(model, tokenizer, target, report=report, fmt=format, overwrite=overwrite,
                                    targets=pruned, files=files)
            except KeyboardInterrupt:
                if run.saved_blocks == 0:
                    run.remove()
                    raise LlmpruneError(f"interrupted while saving {target}; nothing was written (the run was shorter than "
                                        "--checkpoint-every, so no state was kept): run the command again.") from None
                kept = ("every pruned block is" if run.saved_blocks == run.total
                        else f"the first {run.saved_blocks} of {run.total} pruned blocks are")
                raise LlmpruneError(f"interrupted while saving {target}; nothing of it was written, and {kept} kept in "
                                    f"{partial}: rerun with --resume to continue from there.") from None
            run.remove()
        dist.barrier()
        timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    return (None if shards is not None else model), report


def _leftover_run(out, resume: bool):
    """OUT.partial's path and, with resume, the progress record of the run it holds (None: start afresh)."""
    from llmprune import streaming

    if out is None:
        return None, None
    partial = streaming.partial_path(out)
    if partial.exists():
        if not resume:
            raise LlmpruneError(f"{partial} holds an unfinished run; continue it with --resume (same options), "
                                f"or delete it to start over: rm -r '{partial}'")
        return partial, streaming.PartialRun.read_progress(partial)
    if resume:
        log.info("nothing to resume in %s; starting from the first block", partial)
    return partial, None


def _load(model_or_path, tokenizer, *, stream: bool | None, dtype: str | None, dist, allow_pickle: bool,
          trust_remote_code: bool):
    """(model, tokenizer, source description, ShardSource or None): a streamed model is built on the meta device."""
    from llmprune import streaming

    if isinstance(model_or_path, nn.Module):
        if stream:
            raise LlmpruneError("--stream reads a model directory block by block; pass its path, not a loaded model.")
        if dtype is not None:
            model_or_path.to(models.parse_dtype(dtype))
        return model_or_path, tokenizer, {"spec": type(model_or_path).__name__, "kind": "module"}, None
    src = models.resolve_source(model_or_path)
    stream_dir = _stream_directory(src, stream, dtype, dist)
    if stream_dir is not None:
        from transformers import AutoTokenizer

        shards = streaming.ShardSource(stream_dir)
        try:
            model = shards.build(models.parse_dtype(dtype), trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(str(stream_dir), trust_remote_code=trust_remote_code)
            return model, tokenizer, {**asdict(src), "streamed": True}, shards
        except LlmpruneError as exc:
            if stream:
                raise
            log.warning("cannot stream this checkpoint (%s); loading it whole", exc)
    model, tokenizer, src = checkpoint.load_model(model_or_path, dtype=dtype, allow_pickle=allow_pickle,
                                                  trust_remote_code=trust_remote_code)
    return model, tokenizer, {**asdict(src), "streamed": False}, None


def _activation_bytes(windows, model: nn.Module, dist, sequential: bool) -> int:
    """Memory the calibration activations take in one process. Two-pass holds each micro-batch's block input and
    output (2 hidden states a token); sequential runs every micro-batch through the block in lockstep, so at the
    MLP's down projection each holds its input, the residual, the normed input and the MLP's inner product:
    3 hidden states and one intermediate (5.4 hidden states a token on SmolLM2, measured from peak RSS against
    two-pass; 3 + 1536 / 576 = 5.7 predicted)."""
    config = model.config.get_text_config()
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 3 * hidden + inner if sequential else 2 * hidden
    itemsize = next(model.parameters()).element_size()
    return windows.numel() // dist.world * per_token * itemsize


def _place_activations(asked, windows, model: nn.Module, partial: Path | None, dist, device: torch.device,
                       sequential: bool) -> tuple[Path | None, bool]:
    """(where the calibration activations go, whether the sequential schedule runs): the asked directory; else in
    memory (on the compute device, where they live) with the asked schedule when its activations fit (see
    `_activation_bytes`), in memory with the two-pass schedule when only its activations fit, and otherwise in
    OUT.partial/activations (a temporary directory without --out), one micro-batch in memory at a time."""
    if asked is not None:
        return Path(asked).expanduser(), sequential
    if windows is None:
        return None, sequential
    free = _free_memory(device)
    if free is None:
        return None, sequential
    asked_bytes = _activation_bytes(windows, model, dist, sequential)
    if asked_bytes <= free:
        return None, sequential
    needed = _activation_bytes(windows, model, dist, False) if sequential else asked_bytes
    if needed <= free:  # only with sequential asked: two-pass needs less
        log.warning("running the two-pass schedule: the sequential one holds every micro-batch's activations at once "
                    "(%.1f GB here), more than the %.1f GB free", asked_bytes / 1e9, free / 1e9)
        return None, False
    if partial is not None:
        where = partial / "activations"
    else:
        import tempfile

        where = Path(tempfile.mkdtemp(prefix="llmprune-activations-"))
    log.warning("offloading the calibration activations to %s: they would take %.1f GB, %.1f GB is free", where,
                needed / 1e9, free / 1e9)
    return where, sequential


def _clean_offload(offload: Path | None, *, asked: bool, dist) -> None:
    """Remove the activation files this process wrote (and the directory, where it was ours)."""
    if offload is None or not offload.is_dir():
        return
    for file in offload.glob(f"*rank{dist.rank}-microbatch*.safetensors"):
        file.unlink(missing_ok=True)
    if not asked and not any(offload.iterdir()):
        offload.rmdir()


def _stream_directory(src: models.ModelSource, stream: bool | None, dtype: str | None, dist) -> Path | None:
    """The safetensors directory to stream from, or None to load the model whole: --stream forces streaming,
    --no-stream forbids it, and by default a model streams when it would take more than half the free memory."""
    if stream is False:
        return None
    if src.kind == "gguf":
        if stream:
            raise LlmpruneError("--stream reads safetensors shards; a GGUF model is converted in memory: drop --stream.")
        return None
    directory = Path(src.path) if src.kind == "dir" else _hub_snapshot(src.path, src.revision)
    if directory is None:
        if stream:
            raise LlmpruneError(f"could not fetch the safetensors shards of '{src.spec}' to stream them; check the name "
                                "and your network, or pass a local directory.")
        return None
    if checkpoint.read_format(directory) is not None:
        if stream:
            raise LlmpruneError(f"{directory} is a compressed checkpoint; streaming reads dense safetensors: drop --stream.")
        return None
    if stream:
        return directory
    size = sum(f.stat().st_size for f in checkpoint.weight_files(directory) if f.is_file())
    wanted = models.parse_dtype(dtype)
    if wanted is not None:
        import json

        config = json.loads((directory / "config.json").read_text())
        stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
        size = size * wanted.itemsize // stored.itemsize
    free = _free_memory()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if free is None or size <= free / 2 / processes:
        return None
    log.warning("streaming: the model (%.1f GB) would take more than half the free memory (%.1f GB%s); its blocks are "
                "read from disk one at a time", size / 1e9, free / 1e9, f" for {processes} processes" if processes > 1 else "")
    return directory


def _hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """A local copy of a Hub model's safetensors, configs and tokenizer (None offline or without safetensors)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # offline, gated, missing: the ordinary loader reports it better
        log.debug("no snapshot of %s: %s", repo_id, exc)
        return None
    return path if list(path.glob("*.safetensors")) else None


def _free_memory(device: torch.device | None = None) -> int | None:
    """Free bytes where tensors on `device` live: the GPU's free memory for CUDA, else the host's available memory."""
    if device is not None and device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _owl(model, windows, recipe: Recipe, microbatch: int | None, device, store, dist, offload) -> dict:
    """OWL's per-block sparsities from the dense model's outlier ratios."""
    from llmprune import allocation

    ratios, sizes = calibrate.outlier_ratios(model, windows, m=recipe.owl_m, ignore=recipe.ignore, targets=recipe.targets,
                                             microbatch=microbatch, device=device, store=store, dist=dist, offload=offload)
    block_sparsity = allocation.owl_blocks(ratios, sizes, recipe.sparsity, lam=recipe.owl_lambda)
    log.info("OWL block sparsities: %s", ", ".join(f"{v:.3f}" for v in block_sparsity))
    return {"method": "owl", "m": recipe.owl_m, "lambda": recipe.owl_lambda, "outlier_ratios": ratios,
            "block_sparsity": block_sparsity}


def _sparsity_of(model, recipe: Recipe, block_sparsity: list[float] | None):
    """The sparsity of each linear by full name: an override, else its block's allocation, else the target."""
    blocks_name, _ = models.find_blocks(model)

    def sparsity_of(name: str) -> float:
        value = recipe.sparsity_override(name)
        if value is not None:
            return value
        if block_sparsity is None:
            return recipe.sparsity
        return block_sparsity[int(name[len(blocks_name) + 1:].split(".", 1)[0])]
    return sparsity_of


def evaluate(
    model_specs: list[str | None] | None = None,
    *,
    baseline: str | None = None,
    ppl: str | None = "wikitext2",
    seqlen: int | None = None,
    max_windows: int | None = None,
    start: int = 0,
    batch_size: int = 1,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    tasks_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | None = None,
    record: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate models (and a dense baseline) on perplexity, divergence from the baseline and lm-eval tasks.

    Models are loaded one at a time beside the baseline, so memory holds at most two. Each model that is
    an llmprune output directory gets its results merged into its llmprune.json under "eval" (record=True).
    Returns {"text", "seqlen", "windows", "baseline", "tasks", "models": [{"model", "role", ...}, ...]}.
    """
    from llmprune import evaluate as ev

    model_specs = list(model_specs or [None])
    task_names = ev.parse_tasks(",".join(tasks) if isinstance(tasks, (list, tuple)) else tasks)
    manager = ev.task_manager(task_names, tasks_dir) if task_names else None  # bad names fail before any load
    if batch_size < 1:
        raise LlmpruneError(f"--batch-size must be at least 1; got {batch_size}.")
    if max_windows is not None and max_windows < 1:
        raise LlmpruneError(f"--max-windows must be at least 1; got {max_windows}.")
    if limit is not None and limit < 1:
        raise LlmpruneError(f"--limit must be at least 1; got {limit}.")
    compute = resolve_device(device)
    result: dict = {"text": ppl, "seqlen": None, "windows": None, "start": start, "baseline": baseline,
                    "tasks": task_names, "limit": limit, "num_fewshot": num_fewshot, "models": []}

    base_entry = None
    base_model = base_tok = None
    if baseline is not None:
        base_model, base_tok, _ = checkpoint.load_model(baseline, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        base_model.to(compute)
        base_entry = {"model": baseline, "role": "baseline"}
        result["models"].append(base_entry)

    tokens = None
    for spec in model_specs:
        model, tokenizer, source = checkpoint.load_model(spec, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        name = spec or "smollm2"
        if base_tok is not None:
            _check_same_tokenizer(tokenizer, base_tok, name, baseline)
        model.to(compute)
        entry: dict = {"model": name, "role": "model"}
        record_entry: dict = {}
        if ppl:
            used = _cap_seqlen(seqlen, [m for m in (model, base_model) if m is not None])
            if tokens is None or base_tok is None:  # with a baseline every model shares its tokenizer
                tokens = data.eval_tokens(ppl, tokenizer, seqlen=used)
            scores = ev.perplexity(model, tokens, seqlen=used, max_windows=max_windows, start=start,
                                batch_size=batch_size, device=compute, baseline=base_model, desc=f"perplexity {name}")
            result["seqlen"], result["windows"] = used, scores["windows"]
            entry.update(ppl=scores["ppl"], mean_loss=scores["mean_loss"])
            where = {"text": ppl, "seqlen": used, "windows": scores["windows"], "start": start}
            record_entry["perplexity"] = [{**where, "ppl": scores["ppl"]}]
            if base_model is not None:
                entry.update(kl=scores["kl"], top1_agreement=scores["top1_agreement"])
                base_entry.setdefault("ppl", scores["baseline_ppl"])
                record_entry["divergence"] = [{**where, "baseline": baseline, "kl": scores["kl"],
                                               "top1_agreement": scores["top1_agreement"],
                                               "baseline_ppl": scores["baseline_ppl"]}]
        if task_names:
            zs = ev.evaluate_tasks(model, tokenizer, task_names, manager=manager, limit=limit,
                                         batch_size=batch_size, num_fewshot=num_fewshot)
            entry["tasks"] = zs["tasks"]
            result["lm_eval"] = zs["lm_eval"]
            record_entry.update(tasks=zs["tasks"], lm_eval=zs["lm_eval"])
        if record and source.kind == "dir" and checkpoint.record_eval(source.path, record_entry):
            entry["recorded_in"] = str(Path(source.path) / checkpoint.REPORT_FILE)
        result["models"].append(entry)
        del model
    if base_model is not None and task_names:
        zs = ev.evaluate_tasks(base_model, base_tok, task_names, manager=manager, limit=limit,
                                     batch_size=batch_size, num_fewshot=num_fewshot)
        base_entry["tasks"] = zs["tasks"]
    result["versions"] = versions()
    return result


def _cap_seqlen(seqlen: int | None, loaded: list[nn.Module]) -> int:
    """The window length: `seqlen` as asked (an error past a model's max positions), or by default 2048
    capped at the smallest max positions."""
    limits = [m for m in (models.max_positions(x) for x in loaded) if m is not None]
    limit = min(limits) if limits else None
    if seqlen is None:
        return min(DEFAULT_EVAL_SEQLEN, limit) if limit else DEFAULT_EVAL_SEQLEN
    if seqlen < 2:
        raise LlmpruneError(f"--seqlen must be at least 2 for next-token perplexity; got {seqlen}.")
    if limit is not None and seqlen > limit:
        raise LlmpruneError(f"--seqlen {seqlen} is longer than the model's {limit} positions; use --seqlen {limit} or less.")
    return seqlen


def _check_same_tokenizer(tokenizer, base_tokenizer, name: str, baseline: str) -> None:
    vocab, base_vocab = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    if vocab != base_vocab:
        differ = len(set(vocab.items()) ^ set(base_vocab.items()))
        raise LlmpruneError(
            f"the baseline '{baseline}' has a different tokenizer from '{name}' ({len(base_vocab)} vs {len(vocab)} "
            f"tokens, {differ} entries differ), so KL and top-1 agreement would be meaningless; pass the dense "
            "model that it was pruned from as --baseline."
        )
