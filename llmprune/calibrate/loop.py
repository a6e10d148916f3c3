"""The block loop, shared by pruning and OWL's dense pass: capture block 0's inputs, then for every block: load it,
put it on the compute device, run the calibration micro-batches through it (pruning its linears on the way, or
gathering their statistics), take it back, hand it to the store, and its outputs become the next block's inputs."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from llmprune.calibrate.attention import chunked_attention
from llmprune.calibrate.cache import ActivationCache, run_block
from llmprune.calibrate.lockstep import run_lockstep
from llmprune.calibrate.pruner import BlockPruner, Hooks, LinearResult, apply
from llmprune.calibrate.sharing import distribute
from llmprune.distributed import SINGLE, Dist
from llmprune.errors import LlmpruneError
from llmprune.models import find_blocks, find_linears, get_weight, in_features
from llmprune.plan import Plan
from llmprune.solvers import make_solver

log = logging.getLogger(__name__)


class BlockStore:
    """Where the loop gets block weights and where finished blocks go. This default keeps the whole model in
    memory; a streaming store reads each block from disk in `load` and writes and drops it in `done`."""

    def outside(self) -> contextlib.AbstractContextManager:
        """Context in which the weights outside the blocks that the model runs before block 0 are present."""
        return contextlib.nullcontext()

    def load(self, index: int, block: nn.Module) -> None:
        """Make block `index`'s weights present before it runs."""

    def done(self, index: int, block: nn.Module, results: list[LinearResult], inputs: Sequence[Tensor] | None) -> None:
        """Block `index` is pruned; `inputs` are this process's micro-batches of the next block's inputs (None
        after the last block, or without calibration data)."""

    def release(self, index: int, block: nn.Module) -> None:
        """Block `index` was only read (OWL's dense pass): drop what `load` brought in."""


@contextlib.contextmanager
def placed(module: nn.Module, device: torch.device):
    """`module` on `device` for the body, and back where it was afterwards (even on an error): one block on the
    compute device at a time. (`nn.Module.to` returns the module itself, so comparing what it returns with the
    module, as the loop once did, never moved a block back: on a GPU the whole model piled up on the device.)"""
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def prune_model(model: nn.Module, windows: Tensor | None, plan: Plan, store: BlockStore | None = None, *,
                resume: tuple[int, Sequence[Tensor] | None] | None = None, dist: Dist = SINGLE) -> list[LinearResult]:
    """Prune every target linear of every decoder block in place, as `plan` says; one result per linear.

    windows: [nsamples, seqlen] token ids (None for methods that need no data). store: where block weights come
    from and go (default: in memory). resume: (the block to start at, this process's saved inputs of it). dist:
    under torch.distributed, this rank's share of the micro-batches runs here, statistics are summed over ranks
    and the solves are spread over them.
    """
    recipe = plan.recipe
    store = store or BlockStore()
    start, inputs = resume or (0, None)
    blocks_name, blocks = find_blocks(model)
    if start == 0:  # a resumed run checked this before
        check_some_target(blocks_name, blocks, recipe.ignore, recipe.targets)
    results: list[LinearResult] = []
    progress = Progress(len(blocks), start, dist)
    with torch.no_grad():
        if not plan.needs_data:
            for i in range(start, len(blocks)):
                progress.begin(i, recipe.method)
                store.load(i, blocks[i])
                block_results = _prune_without_data(blocks[i], i, f"{blocks_name}.{i}", plan, dist)
                results.extend(block_results)
                store.done(i, blocks[i], block_results, None)
                progress.end(i, 0)
            progress.close()
            return results
        cache, first_window = _capture(model, blocks, windows, plan, store, dist, f"rank{dist.rank}")
        if inputs is not None and not cache.restore(inputs):
            raise LlmpruneError("the saved block inputs do not match this run's calibration windows; start over "
                                "without --resume.")
        tokens = dist.sum_int(cache.tokens())
        shared: dict[str, list[str]] = {}  # the previous block's input-sharing groups, relative to the block
        with chunked_attention(blocks, plan.device):  # entered after the capture, which builds the masks for sdpa
            for i in range(start, len(blocks)):
                last = i == len(blocks) - 1
                progress.begin(i, "calibrating + pruning" if plan.sequential else "gathering statistics")
                store.load(i, blocks[i])
                with placed(blocks[i], plan.device):
                    block_results, shared = _prune_block(blocks[i], i, f"{blocks_name}.{i}", cache, plan, shared,
                                                         dist, first_window, last, progress)
                results.extend(block_results)
                store.done(i, blocks[i], block_results, None if last else cache.view())
                progress.end(i, tokens)
    progress.close()
    return results


def _capture(model, blocks, windows: Tensor, plan: Plan, store: BlockStore, dist: Dist, tag: str):
    """This rank's share of the micro-batches, run up to block 0; (the cache, the index of its first window)."""
    first, chunks = dist.share(windows.split(plan.microbatch))
    if not chunks:
        raise LlmpruneError(f"{len(windows.split(plan.microbatch))} calibration micro-batches cannot be shared by "
                            f"{dist.world} processes; use more --nsamples or a smaller --microbatch.")
    with store.outside():
        cache = ActivationCache.capture(model, blocks, chunks, plan.device, plan.activations, tag)
    return cache, first * plan.microbatch


def _prune_without_data(block: nn.Module, index: int, prefix: str, plan: Plan, dist: Dist) -> list[LinearResult]:
    """A block pruned by a method that needs no calibration inputs (magnitude); solves shared by the ranks."""
    recipe = plan.recipe
    linears = find_linears(block, prefix, recipe.ignore, recipe.targets, experts=True)

    def solve(name, module):
        started = time.perf_counter()
        W_new = make_solver(recipe.method, in_features(module), plan.device, options=recipe.solver_options).prune(
            get_weight(module), plan.sparsity_of(index, name), recipe.parsed_pattern)
        return [W_new], time.perf_counter() - started

    jobs = [(lambda name=name, module=module: solve(name, module)) for name, module in linears.items()]
    solved = distribute(dist, jobs, [[get_weight(m)] for m in linears.values()])
    return [apply(name, module, W[0], plan.sparsity_of(index, name), seconds, None)
            for (name, module), (W, seconds) in zip(linears.items(), solved)]


def _prune_block(block: nn.Module, index: int, prefix: str, cache: ActivationCache, plan: Plan,
                 shared: dict[str, list[str]], dist: Dist, first_window: int, last: bool, progress: "Progress"):
    """Prune one block (on the compute device) from its cached inputs, leaving its outputs in the cache; returns its
    results and the input-sharing groups seen, relative to the block."""
    recipe = plan.recipe
    dotted = prefix + "."
    predicted = {dotted + leader: [dotted + n for n in names] for leader, names in shared.items()}
    pruner = BlockPruner(find_linears(block, prefix, recipe.ignore, recipe.targets, experts=True), recipe.method,
                         lambda name: plan.sparsity_of(index, name), recipe.parsed_pattern, plan.device, predicted,
                         recipe.dsnot, dist, first_window, recipe.solver_options, recipe.quant_scheme)
    if plan.sequential:
        for k, out in enumerate(run_lockstep(block, index, cache, pruner, outputs_needed=not last) or []):
            cache.update(k, out)
    else:
        with pruner.hooks(sync=False):
            for k in range(len(cache)):
                run_block(block, index, cache, k)
        progress.doing(index, "pruning")
        pruner.prune_all(list(pruner.order))
        progress.doing(index, "propagating")
        if not last:  # each micro-batch's input is replaced by its output as soon as it is computed
            for k in range(len(cache)):
                cache.update(k, run_block(block, index, cache, k))
    shared = {leader[len(dotted):]: [n[len(dotted):] for n in names] for leader, names in pruner.shared_groups().items()}
    missing = set(pruner.linears) - set(pruner.pruned)
    if missing:
        raise RuntimeError(f"linears never called by the block's forward: {sorted(missing)}")
    return pruner.results, shared


class _WandaStatistics:
    """What the hooks feed in OWL's dense pass: a Wanda solver per linear (and expert projection), whose scores OWL
    counts the outliers of."""

    def __init__(self, linears: dict, method_device):
        from llmprune.solvers.wanda import WandaSolver

        self.linears, self.pruned = linears, set()
        self.solvers = {name: WandaSolver(in_features(m), method_device) for name, m in linears.items()}

    def observe(self, name: str, x: Tensor, own: bool = False) -> None:
        self.solvers[name].add_batch(x)


def outlier_ratios(model: nn.Module, windows: Tensor, plan: Plan, store: BlockStore | None = None, *,
                   dist: Dist = SINGLE) -> tuple[list[float], list[int]]:
    """OWL's statistics of the dense model: each block's outlier ratio of Wanda scores, and its number of prunable
    weights. One forward pass through the dense blocks (`store.load` gives each block's weights; nothing is
    written)."""
    from tqdm.auto import tqdm

    from llmprune.allocation import outlier_ratio

    recipe = plan.recipe
    store = store or BlockStore()
    blocks_name, blocks = find_blocks(model)
    check_some_target(blocks_name, blocks, recipe.ignore, recipe.targets)
    ratios, sizes = [], []
    with torch.no_grad():
        cache, _ = _capture(model, blocks, windows, plan, store, dist, f"owl-rank{dist.rank}")
        for i in tqdm(range(len(blocks)), desc="outlier ratios", unit="block", disable=None if dist.main else True,
                      dynamic_ncols=True):
            store.load(i, blocks[i])
            with placed(blocks[i], plan.device):
                stats = _WandaStatistics(find_linears(blocks[i], f"{blocks_name}.{i}", recipe.ignore, recipe.targets,
                                                      experts=True), plan.device)
                with Hooks(stats, sync=False), chunked_attention(blocks[i], plan.device):
                    for k in range(len(cache)):
                        cache.update(k, run_block(blocks[i], i, cache, k))
                scores = []
                for name, module in stats.linears.items():
                    stats.solvers[name].reduce_(dist.sum_)
                    scores.append(stats.solvers[name].scores(get_weight(module)))
                ratios.append(outlier_ratio(scores, recipe.owl_m) if scores else 0.0)
                sizes.append(sum(s.numel() for s in scores))
            store.release(i, blocks[i])
            log.info("block %d/%d: outlier ratio %.4f", i + 1, len(blocks), ratios[-1])
    return ratios, sizes


def check_some_target(blocks_name: str, blocks, ignore: tuple[str, ...], targets: tuple[str, ...]) -> None:
    if not any(find_linears(block, f"{blocks_name}.{i}", ignore, targets, experts=True) for i, block in enumerate(blocks)):
        if targets:
            raise LlmpruneError(f"no linear layer is left to prune: targets {list(targets)} less ignore {list(ignore)} "
                                f"match none of {blocks_name}.*; fix the regexes.")
        raise LlmpruneError(f"no linear layer is left to prune: the ignore patterns {list(ignore)} match them all; loosen --ignore.")


class Progress:
    """The bar over blocks (rank 0 only): block i/N, what it does, tokens/s through the last block, memory, ETA."""

    def __init__(self, total: int, start: int, dist: Dist):
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, initial=start, desc="pruning", unit="block", disable=None if dist.main else True,
                        dynamic_ncols=True)
        self.rate = ""
        self.started = time.perf_counter()

    def begin(self, index: int, doing: str) -> None:
        self.started = time.perf_counter()
        self.doing(index, doing)

    def doing(self, index: int, what: str) -> None:
        self.bar.set_postfix_str(f"block {index + 1}/{self.total}: {what}{self.rate}, {memory_in_use()}")

    def end(self, index: int, tokens: int) -> None:
        seconds = time.perf_counter() - self.started
        self.rate = f", {tokens / seconds:,.0f} tok/s" if tokens and seconds > 0 else ""
        # one log line per block where no bar shows progress (logs to a file, batch jobs), else it goes to debug
        log.log(logging.DEBUG if self.bar.disable is False else logging.INFO, "block %d/%d done in %.1fs%s, %s",
                index + 1, self.total, seconds, self.rate, memory_in_use())
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def memory_in_use() -> str:
    """This process's resident memory (and the GPU's allocated memory when one is in use), for progress lines."""
    parts = []
    try:
        with open(f"/proc/{os.getpid()}/statm") as handle:
            parts.append(f"RSS {int(handle.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GiB")
    except OSError:  # not Linux: the peak is what the platform offers
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        parts.append(f"peak RSS {peak / (2**30 if os.uname().sysname == 'Darwin' else 2**20):.2f} GiB")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(f"GPU {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    return ", ".join(parts)
