"""prune(): load → calibration data → calibrate → save. The library form of `llmprune prune`."""
from __future__ import annotations

import logging
import os
import platform
import time
import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from llmprune import calibrate, checkpoint, data, models
from llmprune import plan as plan_
from llmprune.errors import LlmpruneError
from llmprune.masks import check_pattern_fits
from llmprune.partial import PartialRun, partial_path
from llmprune.recipe import RECIPE_FILE, Recipe
from llmprune.shards import ShardSource

log = logging.getLogger(__name__)

DEFAULT_EVAL_SEQLEN = 2048  # SparseGPT's and DSnoT's evaluation window (Wanda's LLaMA-2 numbers use 4096)


from llmprune.plan import resolve_device  # noqa: E402,F401  (the CLI and evaluate resolve devices here too)


def versions() -> dict:
    import transformers

    from llmprune.version import __version__

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out, beside what it does (the Recipe): none of these change the masks.

    format: 'compressed' (llmprune's sparse layout, the default), 'dense' (zeros stored; loads anywhere) or
    'compressed-tensors' (0.14's layout). stream: read one decoder block at a time from the safetensors shards
    (None: when the model would not fit in half the free memory). offload_activations: a directory for the
    calibration activations (chosen in OUT.partial/ when they would not fit in memory). checkpoint_every: least
    seconds between two saves of the partial run's state (default 60; 0 saves after every block).
    """

    device: str | torch.device | None = "auto"
    dtype: str | None = None
    microbatch: int | None = None
    format: str = "compressed"
    overwrite: bool = False
    resume: bool = False
    stream: bool | None = None
    offload_activations: str | os.PathLike | None = None
    checkpoint_every: float | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False


_OPTION_FIELDS = {f.name for f in fields(RunOptions)}


def prune(model_or_path: str | nn.Module | None = None, *, recipe: Recipe | None = None, tokenizer=None,
          out: str | os.PathLike | None = None, options: RunOptions | None = None, **fields_):
    """Prune a model; returns (model, report), the model None when it was streamed. Writes the checkpoint to `out`.

    model_or_path: Hub id (owner/name[@revision]), local directory, .gguf file, the alias 'smollm2' (default), or a
    loaded model (then pass its tokenizer for calibration). What to do is the `recipe`, or its fields passed
    directly (method, sparsity, pattern, calibration, nsamples, seqlen, seed, ignore, sequential, ...); how, the
    `options` (RunOptions), or their fields passed directly (device, format, stream, resume, ...). With `out`, the
    run's state lives in OUT.partial/ until OUT/ is complete; resume=True continues it. Under torchrun, the
    calibration data and the solves are shared by the processes.

    >>> model, report = prune("smollm2", method="wanda", sparsity=0.5, calibration="wikitext2-valid",
    ...                       nsamples=16, seqlen=256)                                # doctest: +SKIP
    """
    from llmprune import distributed

    started = time.perf_counter()
    option_fields = {k: fields_.pop(k) for k in list(fields_) if k in _OPTION_FIELDS}
    options = dataclasses.replace(options or RunOptions(), **option_fields)
    if recipe is None:
        recipe = Recipe.create(**fields_)
    elif fields_:
        raise TypeError(f"pass either recipe= or recipe fields, not both: {sorted(fields_)}")
    checkpoint.check_format(options.format, warn=recipe.quantize == "none")
    if out is None and (options.resume or options.stream):
        raise LlmpruneError(f"{'--resume' if options.resume else '--stream'} needs --out: the finished blocks are kept beside it.")
    if isinstance(model_or_path, str) and not model_or_path.strip():
        raise LlmpruneError("the model is empty; pass a Hub id, a local directory, a .gguf file, or leave it out for smollm2.")
    if options.microbatch is not None and options.microbatch < 1:
        raise LlmpruneError(f"--microbatch must be at least 1 calibration window a forward call; got {options.microbatch}.")
    compute = plan_.resolve_device(options.device)
    dist = distributed.from_environment(compute)
    compute = distributed.local_device(compute)
    inputs = (model_or_path,) if isinstance(model_or_path, (str, os.PathLike)) else ()
    out_dir = checkpoint.check_output(out, overwrite=options.overwrite, inputs=inputs) if out is not None else None
    partial, progress = _leftover_run(out, options.resume)
    dist.barrier()  # every rank has looked before rank 0 may create OUT.partial

    timings = {}
    model, tokenizer, source, shards = _load(model_or_path, tokenizer, options, dist)
    if recipe.quant_scheme is not None or recipe.parsed_pattern.structured:  # before any calibration: every target fits
        blocks_name, blocks = models.find_blocks(model)
        targets = {n: m for i, block in enumerate(blocks) for n, m in models.find_linears(
            block, f"{blocks_name}.{i}", recipe.ignore, recipe.targets, experts=True).items()}
        if recipe.quant_scheme is not None:  # every target can be quantized, every group fits
            recipe.quant_scheme.check_linears(targets)
        check_pattern_fits(recipe.parsed_pattern, {n: models.in_features(m) for n, m in targets.items()})
    timings["load_s"] = time.perf_counter() - started
    seqlen, capped = plan_.capped_seqlen(recipe.seqlen, model)
    windows = None
    if recipe.needs_data or recipe.allocation == "owl":
        if tokenizer is None:
            raise LlmpruneError(f"this recipe ({recipe.method}, {recipe.allocation}, refine {recipe.refine}) needs calibration text, "
                                "so pass the model's tokenizer too.")
        t0 = time.perf_counter()
        windows = data.calibration_windows(recipe.calibration, tokenizer, nsamples=recipe.nsamples, seqlen=seqlen, seed=recipe.seed)
        timings["data_s"] = time.perf_counter() - t0
    plan = plan_.decide(recipe, model, windows, device=compute, seqlen=seqlen, microbatch=options.microbatch,
                        activations=options.offload_activations, partial=partial, dist=dist,
                        checkpoint_every=options.checkpoint_every, streamed=shards is not None,
                        notes=(capped,) if capped else ())
    run = None
    if out_dir is not None:
        run = PartialRun(partial, model, options={"model": source["spec"], **plan.to_dict()}, dist=dist,
                                   source=shards, every=plan.checkpoint_every)
    try:
        plan, linears, allocated, resumed_after = _run(model, windows, plan, run, progress, dist, timings)
    finally:
        _clean_offload(plan.activations, asked=options.offload_activations is not None, dist=dist)

    report = _report(recipe, plan, source, model, linears, allocated, timings)
    if resumed_after is not None:
        report["resumed_after_block"] = resumed_after
    if out_dir is not None:
        _save(model, tokenizer, out_dir, report, run, recipe, options, partial, shards, dist, timings)
    timings["total_s"] = time.perf_counter() - started
    return (None if shards is not None else model), report


def _run(model, windows, plan: plan_.Plan, run, progress, dist, timings):
    """OWL's allocation (where asked) and the pruning, as the plan says, taken up after the blocks a partial run
    saved; (the plan with its allocation, each linear's result, OWL's allocation, the block resumed after)."""
    try:
        start, inputs, allocated = 0, None, None
        if progress is not None:
            inputs = run.resume(progress, needs_inputs=plan.needs_data)
            start, allocated = run.done_blocks, run.extra.get("allocation")
            plan = dataclasses.replace(plan, notes=tuple(run.extra.get("notes", plan.notes)))
            log.info("resuming %s after block %d of %d", run.path, start, run.total)
        if plan.recipe.allocation == "owl" and allocated is None:
            t0 = time.perf_counter()
            allocated = _owl(model, windows, plan, run, dist)
            timings["allocation_s"] = time.perf_counter() - t0
        if allocated is not None:
            plan = plan.with_allocation(allocated["block_sparsity"])
        if run is not None and progress is None:
            run.start({"allocation": allocated, "notes": list(plan.notes)})
        t0 = time.perf_counter()
        results = calibrate.prune_model(model, windows, plan, run, resume=(start, inputs), dist=dist) \
            if run is None or start < run.total else []
        timings["prune_s"] = time.perf_counter() - t0
    except BaseException as exc:
        if run is not None and progress is None and run.saved_blocks == 0:
            run.remove()  # nothing worth resuming
        elif run is not None and isinstance(exc, KeyboardInterrupt):
            saved = "" if run.saved_blocks == run.done_blocks else f" (the last save holds {run.saved_blocks})"
            raise LlmpruneError(f"interrupted after {run.done_blocks} of {run.total} blocks{saved}; continue with --resume "
                                f"(the finished blocks are kept in {run.path}).") from None
        raise
    linears = run.results if run is not None else [asdict(r) for r in results]
    return plan, linears, allocated, (start if progress is not None else None)


def _report(recipe: Recipe, plan: plan_.Plan, source: dict, model, linears: list[dict], allocated: dict | None,
            timings: dict) -> dict:
    total = sum(r["shape"][0] * r["shape"][1] for r in linears)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in linears)
    return {
        "recipe": recipe.to_dict(),
        "seqlen_used": plan.seqlen,
        "notes": list(plan.notes),
        "model": source,
        "model_class": type(model).__name__,
        "dtype": plan.dtype,
        "device": str(plan.device),
        "processes": plan.processes,
        "sparsity": zeros / total,
        "allocation": allocated,
        "linears": linears,
        "timings": timings,
        "versions": versions(),
    }


def _save(model, tokenizer, out_dir: Path, report: dict, run, recipe: Recipe, options: RunOptions, partial, shards, dist,
          timings) -> None:
    """Write OUT/ (rank 0), from the model in memory or, streamed, from the finished blocks; then drop OUT.partial/."""
    t0 = time.perf_counter()
    report["output"] = str(out_dir)
    files = {RECIPE_FILE: recipe.to_yaml("the recipe this checkpoint was pruned with; "
                                         "`llmprune prune MODEL --recipe recipe.yaml` reproduces its masks")}
    pruned = {r["name"] for r in report["linears"] if r["sparsity"] > 0}
    if dist.main:
        try:
            if shards is not None:
                run.assemble(out_dir, tokenizer=tokenizer, fmt=options.format, pruned=pruned, report=report, files=files,
                             overwrite=options.overwrite, scheme=recipe.quant_scheme)
            else:
                checkpoint.save(model, tokenizer, out_dir, report=report, fmt=options.format, overwrite=options.overwrite,
                                pruned=pruned, files=files, scheme=recipe.quant_scheme)
        except KeyboardInterrupt:
            if run.saved_blocks == 0:
                run.remove()
                raise LlmpruneError(f"interrupted while saving {out_dir}; nothing was written (the run was shorter than "
                                    "--checkpoint-every, so no state was kept): run the command again.") from None
            kept = ("every pruned block is" if run.saved_blocks == run.total
                    else f"the first {run.saved_blocks} of {run.total} pruned blocks are")
            raise LlmpruneError(f"interrupted while saving {out_dir}; nothing of it was written, and {kept} kept in "
                                f"{partial}: rerun with --resume to continue from there.") from None
        run.remove()
    dist.barrier()
    timings["save_s"] = time.perf_counter() - t0


def _leftover_run(out, resume: bool):
    """OUT.partial's path and, with resume, the progress record of the run it holds (None: start afresh)."""
    if out is None:
        return None, None
    partial = partial_path(out)
    if partial.exists():
        if not resume:
            raise LlmpruneError(f"{partial} holds an unfinished run; continue it with --resume (same options), "
                                f"or delete it to start over: rm -r '{partial}'")
        return partial, PartialRun.read_progress(partial)
    if resume:
        log.info("nothing to resume in %s; starting from the first block", partial)
    return partial, None


def _load(model_or_path, tokenizer, options: RunOptions, dist):
    """(model, tokenizer, source description, ShardSource or None): a streamed model is built on the meta device."""
    if isinstance(model_or_path, nn.Module):
        if options.stream:
            raise LlmpruneError("--stream reads a model directory block by block; pass its path, not a loaded model.")
        if options.dtype is not None:
            model_or_path.to(models.parse_dtype(options.dtype))
        return model_or_path, tokenizer, {"spec": type(model_or_path).__name__, "kind": "module"}, None
    src = models.resolve_source(model_or_path)
    if options.stream is not False and src.kind != "gguf":
        directory = Path(src.path) if src.kind == "dir" else _hub_snapshot(src.path, src.revision)
        if plan_.should_stream(directory, options.stream, options.dtype, what=src.spec):
            from transformers import AutoTokenizer

            shards = ShardSource(directory)
            try:
                model = shards.build(models.parse_dtype(options.dtype), trust_remote_code=options.trust_remote_code)
                tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=options.trust_remote_code)
                return model, tokenizer, {**asdict(src), "streamed": True}, shards
            except LlmpruneError as exc:
                if options.stream:
                    raise
                log.warning("cannot stream this checkpoint (%s); loading it whole", exc)
    elif options.stream and src.kind == "gguf":
        raise LlmpruneError("--stream reads safetensors shards; a GGUF model is converted in memory: drop --stream.")
    model, tokenizer, src = checkpoint.load_model(model_or_path, dtype=options.dtype, allow_pickle=options.allow_pickle,
                                                  trust_remote_code=options.trust_remote_code)
    return model, tokenizer, {**asdict(src), "streamed": False}, None


def _clean_offload(offload: Path | None, *, asked: bool, dist) -> None:
    """Remove the activation files this process wrote (and the directory, where it was ours)."""
    if offload is None or not offload.is_dir():
        return
    for file in offload.glob(f"*rank{dist.rank}-microbatch*.safetensors"):
        file.unlink(missing_ok=True)
    if not asked and not any(offload.iterdir()):
        offload.rmdir()


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


def _owl(model, windows, plan: plan_.Plan, store, dist) -> dict:
    """OWL's per-block sparsities from the dense model's outlier ratios."""
    from llmprune import allocation

    recipe = plan.recipe
    ratios, sizes = calibrate.outlier_ratios(model, windows, plan, store, dist=dist)
    block_sparsity = allocation.owl_blocks(ratios, sizes, recipe.sparsity, lam=recipe.owl_lambda)
    log.info("OWL block sparsities: %s", ", ".join(f"{v:.3f}" for v in block_sparsity))
    return {"method": "owl", "m": recipe.owl_m, "lambda": recipe.owl_lambda, "outlier_ratios": ratios,
            "block_sparsity": block_sparsity}


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
    if num_fewshot is not None and num_fewshot < 0:
        raise LlmpruneError(f"--num-fewshot must be 0 or more examples; got {num_fewshot}.")
    if start < 0:
        raise LlmpruneError(f"--start is the first token of the text to use and must be 0 or more; got {start}.")
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
