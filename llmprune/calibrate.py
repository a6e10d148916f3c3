"""The layer-by-layer pruning loop: the only place that runs decoder blocks.

Block 0's inputs are captured with every argument the model passes each block (masks, position
embeddings, ...). Then, block by block, hooks on the target linears feed the solvers, each linear is
pruned, and the calibration windows leave the block as the next block's inputs.

Two schedules:
- sequential (default): one pass per block. The micro-batches run as cooperative greenlets that all
  pause at each linear; once every micro-batch has reached it, the linear is pruned and the
  micro-batches continue through the pruned weight. Every linear is thus calibrated on inputs that
  already see the pruned linears upstream (the "true-sequential" order of the GPTQ authors' scripts),
  at the cost of a single forward pass.
- two-pass (the reference scripts' schedule): a dense pass gathers every linear's statistics, all
  linears are pruned, and a second pass through the pruned block gives the next block's inputs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import greenlet
import torch
from torch import Tensor, nn

from llmprune.distributed import SINGLE, Dist
from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern
from llmprune.models import (ExpertProjection, expert_hidden, find_blocks, find_linears, get_weight, in_features,
                             routing, set_weight_)
from llmprune.solvers import Solver, make_solver, needs_data

log = logging.getLogger(__name__)

FALLBACK = "magnitude"  # for experts that saw fewer calibration tokens than their input width
TOKENS_PER_MICROBATCH = 2048  # keeps the block's activations cache-sized on CPUs; measured fastest for SmolLM2


@dataclass
class LinearResult:
    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of zeros after pruning
    target: float
    seconds: float
    shares_statistics_with: str | None = None
    refine: dict | None = None  # what DSnoT changed: rows refined, swaps, output error before and after
    tokens: int | None = None  # calibration tokens routed to this expert projection (experts only)
    fallback: str | None = None  # the method used instead, for an expert that saw too few tokens


class _Captured:
    """One micro-batch: its hidden states [microbatch, seqlen, hidden] (in memory, or in a file of its own once
    offloaded) and, per block, the other arguments the model passes (positional args after the hidden states,
    and kwargs)."""

    def __init__(self, hidden: Tensor, args: list[tuple[tuple, dict]]):
        self.args = args
        self.device = hidden.device
        self._file: Path | None = None
        self.hidden = hidden

    def offload(self, file: Path) -> None:
        hidden, self._file = self.hidden, file
        self.hidden = hidden

    @property
    def hidden(self) -> Tensor:
        if self._file is None:
            return self._hidden
        from safetensors.torch import load_file

        return load_file(str(self._file))["hidden"].to(self.device)

    @hidden.setter
    def hidden(self, x: Tensor) -> None:
        self.shape, self.dtype = tuple(x.shape), x.dtype
        if self._file is None:
            self._hidden = x
        else:
            from safetensors.torch import save_file

            self._hidden = None
            save_file({"hidden": x.detach().to("cpu").contiguous()}, str(self._file))


class _Inputs(Sequence):
    """The micro-batches' hidden states, read one at a time (for stores that save them)."""

    def __init__(self, captured: list[_Captured]):
        self.captured = captured

    def __len__(self) -> int:
        return len(self.captured)

    def __getitem__(self, k):
        return self.captured[k].hidden

    @property
    def shapes(self) -> list[tuple[torch.dtype, tuple]]:
        return [(c.dtype, c.shape) for c in self.captured]


class _Stop(Exception):
    pass


def default_microbatch(seqlen: int) -> int:
    return max(1, TOKENS_PER_MICROBATCH // max(seqlen, 1))


class BlockStore:
    """Where the loop gets block weights and where finished blocks go. This default keeps the whole model in
    memory; a streaming store reads each block from disk in `load` and writes and drops it in `done`."""

    def outside(self) -> contextlib.AbstractContextManager:
        """Context in which the weights outside the blocks that the model runs before block 0 are present."""
        return contextlib.nullcontext()

    def load(self, index: int, block: nn.Module) -> None:
        """Make block `index`'s weights present before it runs."""

    def done(self, index: int, block: nn.Module, results: list[LinearResult], inputs: list[Tensor] | None) -> None:
        """Block `index` is pruned; `inputs` are this process's micro-batches of the next block's inputs (None
        after the last block, or without calibration data)."""

    def release(self, index: int, block: nn.Module) -> None:
        """Block `index` was only read (OWL's dense pass): drop what `load` brought in."""


def prune_model(
    model: nn.Module,
    windows: Tensor | None,
    *,
    method: str,
    sparsity: float | Callable[[str], float],
    pattern: Pattern,
    ignore: tuple[str, ...] = (),
    targets: tuple[str, ...] = (),
    sequential: bool = True,
    microbatch: int | None = None,
    device: torch.device | str = "cpu",
    refine=None,
    store: BlockStore | None = None,
    start: int = 0,
    inputs: list[Tensor] | None = None,
    dist: Dist = SINGLE,
    offload: Path | None = None,
) -> list[LinearResult]:
    """Prune every target linear of every decoder block in place; returns one result per linear.

    windows: [nsamples, seqlen] token ids (None for methods that need no data). sparsity may be a
    function of the linear's full name (per-layer allocation). refine: a DSnoTConfig to run DSnoT
    after the solver on every linear. store: where block weights come from and go (default: in memory).
    start, inputs: resume at block `start` with its saved inputs (this process's micro-batches).
    dist: under torch.distributed, this rank's share of the micro-batches runs here, statistics are summed
    over ranks and the solves are spread over them. offload: a directory for the calibration activations, so
    memory holds one micro-batch at a time (the two-pass schedule: lockstep needs every micro-batch at once).
    """
    device = torch.device(device)
    store = store or BlockStore()
    sparsity_of = sparsity if callable(sparsity) else (lambda name, s=sparsity: s)
    blocks_name, blocks = find_blocks(model)
    if start == 0:  # a resumed run checked this before
        _check_some_target(blocks_name, blocks, ignore, targets)
    results: list[LinearResult] = []
    progress = _Progress(len(blocks), start, dist)
    with torch.no_grad():
        if not needs_data(method, refine):
            for i in range(start, len(blocks)):
                block = blocks[i]
                progress.begin(i, method)
                store.load(i, block)
                linears = find_linears(block, f"{blocks_name}.{i}", ignore, targets, experts=True)
                jobs = [(lambda name=name, module=module: _solo_solve(method, module, sparsity_of(name), pattern, device))
                        for name, module in linears.items()]
                solved = _distribute(dist, jobs, [[get_weight(m)] for m in linears.values()])
                block_results = [_apply(name, module, W[0], sparsity_of(name), seconds, None)
                                 for (name, module), (W, seconds) in zip(linears.items(), solved)]
                results.extend(block_results)
                store.done(i, block, block_results, None)
                progress.end(i, 0)
            progress.close()
            return results
        if windows is None:
            raise ValueError(f"method {method} needs calibration windows")
        microbatch = microbatch or default_microbatch(windows.shape[1])
        first, chunks = dist.share(windows.split(microbatch))
        if not chunks:
            raise LlmpruneError(f"{len(windows.split(microbatch))} calibration micro-batches cannot be shared by "
                                f"{dist.world} processes; use more --nsamples or a smaller --microbatch.")
        first_window = first * microbatch
        if offload is not None and sequential:
            log.warning("activations offloaded to %s: running the two-pass schedule (lockstep needs every "
                        "micro-batch in memory at once)", offload)
            sequential = False
        with store.outside():
            captured = _capture_all(model, blocks, chunks, device, offload, f"rank{dist.rank}")
        if inputs is not None:
            if len(inputs) != len(captured) or any(tuple(inputs[k].shape) != c.shape for k, c in enumerate(captured)):
                raise LlmpruneError("the saved block inputs do not match this run's calibration windows; "
                                    "start over without --resume.")
            for k, item in enumerate(captured):
                item.hidden = inputs[k].to(device=device, dtype=item.dtype)
        tokens = dist.sum_int(sum(c.shape[0] * c.shape[1] for c in captured))
        shared: dict[str, list[str]] = {}  # the previous block's input-sharing groups, relative to the block
        for i in range(start, len(blocks)):
            block = blocks[i]
            progress.begin(i, "calibrating + pruning" if sequential else "gathering statistics")
            store.load(i, block)
            with placed(block, device):
                block_results, shared = _prune_block(block, i, blocks_name, captured, method, sparsity_of, pattern, ignore,
                                                     targets, device, shared, refine, dist, first_window, sequential,
                                                     i == len(blocks) - 1, progress)
            results.extend(block_results)
            store.done(i, block, block_results, None if i == len(blocks) - 1 else _Inputs(captured))
            progress.end(i, tokens)
    progress.close()
    return results


def _prune_block(block, i, blocks_name, captured, method, sparsity_of, pattern, ignore, targets, device, shared, refine,
                 dist, first_window, sequential, last, progress):
    """Prune one block (on the compute device) from its captured inputs, leaving its outputs in `captured`; returns
    its results and the input-sharing groups seen, relative to the block."""
    prefix = f"{blocks_name}.{i}."
    predicted = {prefix + leader: [prefix + n for n in names] for leader, names in shared.items()}
    pruner = _BlockPruner(find_linears(block, prefix[:-1], ignore, targets, experts=True), method, sparsity_of, pattern, device,
                          predicted, refine, dist, first_window)
    if sequential:
        for item, out in zip(captured, _run_lockstep(block, i, captured, pruner)):
            item.hidden = out
    else:
        with pruner.hooks(sync=False):
            for item in captured:
                _run_block(block, i, item)
        progress.doing(i, "pruning")
        pruner.prune_all(list(pruner.order))
        progress.doing(i, "propagating")
        if not last:  # each micro-batch's input is replaced by its output as soon as it is computed
            for item in captured:
                item.hidden = _run_block(block, i, item)
    shared = {leader[len(prefix):]: [n[len(prefix):] for n in names] for leader, names in pruner.shared_groups().items()}
    missing = set(pruner.linears) - set(pruner.pruned)
    if missing:
        raise RuntimeError(f"linears never called by the block's forward: {sorted(missing)}")
    return pruner.results, shared


class _Progress:
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


def _solo_solve(method: str, module: nn.Module, sparsity: float, pattern: Pattern, device) -> tuple[list[Tensor], float]:
    started = time.perf_counter()
    W_new = make_solver(method, in_features(module), device).prune(get_weight(module), sparsity, pattern)
    return [W_new], time.perf_counter() - started


def _distribute(dist: Dist, jobs: list[Callable[[], tuple[list[Tensor], Any]]], templates: list[list[Tensor]],
                offset: int = 0) -> list[tuple[list[Tensor], Any]]:
    """Run the jobs round-robin over the ranks (job k on rank (offset + k) % world), then give every rank every
    result: each job returns (weights, extra); weights are broadcast from their owner into tensors shaped like
    `templates[k]`, extra goes as a pickled object. In a single process: just the jobs."""
    if not dist.active:
        return [job() for job in jobs]
    owners = [(offset + k) % dist.world for k in range(len(jobs))]
    mine = {k: job() for k, job in enumerate(jobs) if owners[k] == dist.rank}
    out = []
    for k, owner in enumerate(owners):
        weights, extra = mine.get(k, (None, None))
        if owner == dist.rank:
            weights = [dist.broadcast_(W.contiguous(), owner) for W in weights]
        else:
            weights = [dist.broadcast_(torch.empty(t.shape, dtype=t.dtype, device=t.device), owner) for t in templates[k]]
        out.append((weights, dist.broadcast_object(extra, owner)))
    return out


def _check_some_target(blocks_name: str, blocks, ignore: tuple[str, ...], targets: tuple[str, ...]) -> None:
    if not any(find_linears(block, f"{blocks_name}.{i}", ignore, targets, experts=True) for i, block in enumerate(blocks)):
        if targets:
            raise LlmpruneError(f"no linear layer is left to prune: targets {list(targets)} less ignore {list(ignore)} "
                                f"match none of {blocks_name}.*; fix the regexes.")
        raise LlmpruneError(f"no linear layer is left to prune: the ignore patterns {list(ignore)} match them all; loosen --ignore.")


def outlier_ratios(
    model: nn.Module,
    windows: Tensor,
    *,
    m: float,
    ignore: tuple[str, ...] = (),
    targets: tuple[str, ...] = (),
    microbatch: int | None = None,
    device: torch.device | str = "cpu",
    store: BlockStore | None = None,
    dist: Dist = SINGLE,
    offload: Path | None = None,
) -> tuple[list[float], list[int]]:
    """OWL's statistics of the dense model: each block's outlier ratio of Wanda scores, and its number of
    prunable weights. One forward pass through the dense blocks (`store.load` gives each block's weights;
    nothing is written)."""
    from llmprune.allocation import outlier_ratio

    device = torch.device(device)
    store = store or BlockStore()
    blocks_name, blocks = find_blocks(model)
    _check_some_target(blocks_name, blocks, ignore, targets)
    microbatch = microbatch or default_microbatch(windows.shape[1])
    ratios, sizes = [], []
    from tqdm.auto import tqdm

    with torch.no_grad():
        _, chunks = dist.share(windows.split(microbatch))
        with store.outside():
            captured = _capture_all(model, blocks, chunks, device, offload, f"owl-rank{dist.rank}")
        for i, block in enumerate(tqdm(blocks, desc="outlier ratios", unit="block", disable=None if dist.main else True,
                                       dynamic_ncols=True)):
            store.load(i, block)
            with placed(block, device):
                gatherer = _NormGatherer(find_linears(block, f"{blocks_name}.{i}", ignore, targets, experts=True), device)
                with _Hooks(gatherer, sync=False):
                    for item in captured:
                        item.hidden = _run_block(block, i, item)
                scores = [get_weight(module).abs().float() * dist.sum_(gatherer.sq_norms[name]).sqrt().float()
                          for name, module in gatherer.linears.items()]
                ratios.append(outlier_ratio(scores, m) if scores else 0.0)
                sizes.append(sum(s.numel() for s in scores))
            store.release(i, block)
            log.info("block %d/%d: outlier ratio %.4f", i + 1, len(blocks), ratios[-1])
    return ratios, sizes


class _NormGatherer:
    """What the hooks feed for OWL: every linear's (and expert projection's) squared input norms, in fp64."""

    def __init__(self, linears: dict, device):
        self.linears, self.pruned = linears, set()
        self.sq_norms = {name: torch.zeros(in_features(m), dtype=torch.float64, device=device) for name, m in linears.items()}

    def observe(self, name: str, x: Tensor, own: bool = False) -> None:
        self.sq_norms[name] += x.reshape(-1, x.shape[-1]).float().square().sum(0).double()


def _apply(name: str, module: nn.Module, W_new: Tensor, target: float, seconds: float, leader: str | None) -> LinearResult:
    set_weight_(module, W_new)
    zeros = W_new.numel() - int(torch.count_nonzero(W_new != 0))  # 4× faster than counting the floats (measured)
    return LinearResult(name, tuple(W_new.shape), zeros / W_new.numel(), target, seconds, leader)


class _BlockPruner:
    """Hooks that feed a block's linears to their solvers; linears reading the same tensor share one solver.

    Linears that share a solver are pruned together in one solve when the solver supports it
    (``prune_many``). In the sequential schedule the group is not known yet when its first linear must
    be pruned, so it is predicted from the previous block; a member's stashed result is used only once
    its own input has been seen to be the leader's, and recomputed otherwise. Under torch.distributed a
    solver's statistics are summed over the ranks before its first solve, and solves go round-robin.
    """

    def __init__(self, linears: dict[str, nn.Module], method: str, sparsity_of, pattern: Pattern, device,
                 predicted: dict[str, list[str]] | None = None, refine=None, dist: Dist = SINGLE, first_window: int = 0):
        self.linears = linears
        self.refine = refine
        self.method, self.sparsity_of, self.pattern, self.device = method, sparsity_of, pattern, device
        self.dist, self.first_window = dist, first_window
        self.predicted = predicted or {}  # leader name -> the other linears expected to share its input
        self.groups: dict[str, tuple[Solver, str]] = {}  # linear name -> (solver, name of the group's first linear)
        self._by_input: dict[tuple, tuple[Solver, str, Tensor]] = {}
        self._stashed: dict[str, tuple[Solver, Tensor, float, dict | None]] = {}
        self._reduced: set[int] = set()  # ids of solvers whose statistics are summed over ranks
        self._solves = 0
        self.tokens: dict[str, int] = {}  # tokens each expert projection saw (on this rank until summed)
        self.fallback: dict[str, str] = {}
        self.order: list[str] = []
        self.pruned: set[str] = set()
        self.results: list[LinearResult] = []

    def observe(self, name: str, x: Tensor, own: bool = False) -> None:
        """Show linear `name` an input batch; own=True gives it a solver of its own (an expert's routed tokens)."""
        if name in self.pruned:
            return
        group = self.groups.get(name)
        if group is None:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.storage_offset(), x._version, x.dtype)
            shared = None if own else self._by_input.get(key)
            if own:
                group = (make_solver(self.method, x.shape[-1], self.device, self.refine, self.first_window), name)
            elif shared is None:
                solver = make_solver(self.method, x.shape[-1], self.device, self.refine, self.first_window)
                self._by_input[key] = (solver, name, x)  # holding x keeps its address from being reused
                group = (solver, name)
            else:
                group = (shared[0], shared[1])
            self.groups[name] = group
            self.order.append(name)
        solver, leader = group
        if own:
            self.tokens[name] = self.tokens.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]
        if leader == name and x.numel():
            solver.add_batch(x)

    def shared_groups(self) -> dict[str, list[str]]:
        """Leader -> the other linears that read the same input, as observed."""
        groups: dict[str, list[str]] = {}
        for name in self.order:
            leader = self.groups[name][1]
            if leader != name:
                groups.setdefault(leader, []).append(name)
        return groups

    def prune(self, name: str) -> None:
        self.prune_all([name])

    def prune_all(self, names: list[str]) -> None:
        """Prune these linears (with the members of their groups); every rank solves its share, then all share."""
        plans: list[tuple[str, Solver, list[str]]] = []
        planned: set[str] = set()
        for name in names:
            if name in self.pruned or name in planned:
                continue
            solver, leader = self.groups[name]
            stashed = self._stashed.pop(name, None)
            if stashed is not None and stashed[0] is solver:
                self._finish(name, *stashed[1:3], None if leader == name else leader, stashed[3])
                continue
            members = [name]
            if leader == name and solver.solves_together:
                observed = [n for n, g in self.groups.items() if g[1] == name and n != name]
                expected = [n for n in self.predicted.get(name, []) if n in self.linears and n not in self.groups]
                members += [n for n in observed + expected if n not in self.pruned]
            plans.append((name, solver, members))
            planned.update(members)
        for _, solver, _ in plans:
            if id(solver) not in self._reduced:
                solver.reduce_(self.dist.sum_)
                self._reduced.add(id(solver))
        self._fallbacks(plans)
        if self.dist.active and len(plans) < self.dist.world and all(self._rows_shareable(*plan) for plan in plans):
            solved = [self._solve_rows(solver, members) for _, solver, members in plans]  # too few solves to go round
        else:
            jobs = [(lambda solver=solver, members=members: self._solve(solver, members)) for _, solver, members in plans]
            templates = [[get_weight(self.linears[m]) for m in members] for _, _, members in plans]
            solved = _distribute(self.dist, jobs, templates, offset=self._solves)
            self._solves += len(jobs)
        for (name, solver, members), (W_new, (seconds, refined)) in zip(plans, solved):
            leader = self.groups[name][1]
            rows = sum(W.shape[0] for W in W_new)
            for member, W, refine in zip(members, W_new, refined):
                share = seconds * W.shape[0] / rows
                if member == name:
                    self._finish(name, W, share, None if leader == name else leader, refine)
                else:
                    self._stashed[member] = (solver, W, share, refine)
        for name in names:  # members solved with an earlier name of this call
            stashed = self._stashed.get(name)
            if name not in self.pruned and stashed is not None and name in planned and stashed[0] is self.groups[name][0]:
                del self._stashed[name]
                self._finish(name, *stashed[1:3], self.groups[name][1], stashed[3])

    def _fallbacks(self, plans: list) -> None:
        """Experts that saw fewer tokens than their input width are pruned by magnitude (said in the results)."""
        routed = [k for k, (name, _, _) in enumerate(plans) if name in self.tokens]
        if not routed:
            return
        counts = torch.tensor([self.tokens[plans[k][0]] for k in routed], dtype=torch.int64, device=self.device)
        for k, count in zip(routed, self.dist.sum_(counts).tolist()):
            name, _, members = plans[k]
            self.tokens[name] = int(count)
            if count < in_features(self.linears[name]):
                plans[k] = (name, make_solver(FALLBACK, in_features(self.linears[name]), self.device), members)
                self.fallback[name] = FALLBACK

    def _rows_shareable(self, name: str, solver: Solver, members: list[str]) -> bool:
        """Whether the ranks can share this solve's rows: rows independent (Wanda, N:M), or a mask chosen over all
        rows that the ranks can choose together (SparseGPT unstructured), with at least a row for every rank."""
        rows = sum(get_weight(self.linears[m]).shape[0] for m in members)
        coupled = not solver.row_separable(self.pattern)
        return rows >= self.dist.world and (not coupled or solver.selects_across_rows)

    def _solve_rows(self, solver: Solver, members: list[str]) -> tuple[list[Tensor], tuple[float, list[dict | None]]]:
        """One solve shared by the ranks: each prunes a contiguous share of the members' stacked rows, then every
        rank gets every row (for solvers whose rows are independent, this is the single-process result). Where the
        mask is chosen over all rows of a column block (SparseGPT unstructured), the ranks gather each block's scores
        and choose it together, the way one process would."""
        started = time.perf_counter()
        weights = [get_weight(self.linears[m]) for m in members]
        offsets = [0]
        for W in weights:
            offsets.append(offsets[-1] + W.shape[0])
        spans = [Dist(r, self.dist.world).share(range(offsets[-1])) for r in range(self.dist.world)]
        spans = [(start, start + len(rows)) for start, rows in spans]
        lo, hi = spans[self.dist.rank]
        parts = [(k, max(lo, offsets[k]) - offsets[k], min(hi, offsets[k + 1]) - offsets[k]) for k in range(len(members))]
        parts = [(k, a, b) for k, a, b in parts if b > a]
        slices = [weights[k][a:b] for k, a, b in parts]
        names = [members[k] for k, _, _ in parts]
        log.debug("%s: rows %d:%d of %d solved here", members[0], lo, hi, offsets[-1])
        select = None
        if not solver.row_separable(self.pattern):
            from llmprune.solvers.sparsegpt import select_block

            sizes = [b - a for a, b in spans]
            every = [self.sparsity_of(m) for m in members]

            def select(scores: Tensor, _bounds, _sparsities, i1: int, i2: int) -> Tensor:
                return select_block(self.dist.cat(scores, sizes, dim=1), offsets, every, i1, i2)[:, lo:hi]
        local, reports = self._solve_slices(solver, slices, names, select)
        stacked = torch.cat(local) if local else weights[0][:0].clone()
        gathered, all_reports = [], []
        for r, (a, b) in enumerate(spans):
            template = weights[0].new_empty((b - a, weights[0].shape[1]))
            gathered.append(self.dist.broadcast_(stacked.contiguous() if r == self.dist.rank else template, r))
            all_reports.append(self.dist.broadcast_object(list(zip([k for k, _, _ in parts], reports)), r))
        rows = torch.cat(gathered)
        W_new = [rows[offsets[k]:offsets[k + 1]] for k in range(len(members))]
        merged: list[dict | None] = [None] * len(members)
        for per_rank in all_reports:
            for k, report in per_rank:
                if report is not None:
                    merged[k] = report if merged[k] is None else {key: merged[k][key] + report[key] for key in report}
        return W_new, (time.perf_counter() - started, merged)

    def _solve_slices(self, solver: Solver, slices: list[Tensor], names: list[str],
                      select=None) -> tuple[list[Tensor], list[dict | None]]:
        """Prune weights (or row slices of them) of the named linears with one solver: (new weights, DSnoT reports).
        select: the mask choice over every rank's rows, for solvers that choose over all rows (see SparseGPT)."""
        if not slices:
            return [], []
        sparsities = [self.sparsity_of(n) for n in names]
        if select is not None:
            W_new = solver.prune_many(slices, sparsities, self.pattern, select=select)
        elif len(slices) == 1:
            W_new = [solver.prune(slices[0], sparsities[0], self.pattern)]
        else:
            W_new = solver.prune_many(slices, sparsities, self.pattern)
        return W_new, solver.take_reports(len(W_new))

    def _solve(self, solver: Solver, members: list[str]) -> tuple[list[Tensor], tuple[float, list[dict | None]]]:
        started = time.perf_counter()
        W_new, refined = self._solve_slices(solver, [get_weight(self.linears[n]) for n in members], members)
        return W_new, (time.perf_counter() - started, refined)

    def _finish(self, name: str, W_new: Tensor, seconds: float, shared_with: str | None, refine: dict | None) -> None:
        result = _apply(name, self.linears[name], W_new, self.sparsity_of(name), seconds, shared_with)
        result.refine = refine
        result.tokens, result.fallback = self.tokens.get(name), self.fallback.get(name)
        self.results.append(result)
        self.pruned.add(name)

    def hooks(self, sync: bool):
        return _Hooks(self, sync)


class _Hooks:
    """Forward pre-hooks that show each linear's input to the pruner; in lockstep they also pause the micro-batch
    until every micro-batch has arrived and the linear is pruned. A fused experts module gets one hook that shows
    each expert the tokens routed to it: first to its first projections, then (once those are pruned) what its
    down projections read."""

    def __init__(self, pruner: _BlockPruner, sync: bool):
        self.pruner, self.sync, self.handles = pruner, sync, []

    def __enter__(self):
        experts: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, module in self.pruner.linears.items():
            if isinstance(module, ExpertProjection):
                experts.setdefault(id(module.experts), (module.experts, []))[1].append(name)
            else:
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        for module, names in experts.values():
            self.handles.append(module.register_forward_pre_hook(self._experts_hook(names), with_kwargs=True))
        return self

    def _wait(self, names: list[str]) -> None:
        waiting = tuple(n for n in names if n not in self.pruner.pruned)
        if self.sync and waiting:
            greenlet.getcurrent().parent.switch(("sync", waiting))

    def _hook(self, name: str):
        def hook(module, args):
            self.pruner.observe(name, args[0])
            self._wait([name])
        return hook

    def _experts_hook(self, names: list[str]):
        projections = {name: self.pruner.linears[name] for name in names}

        def hook(module, args, kwargs):
            hidden, index, _ = routing(module, args, kwargs)
            routed = [(index == e).any(-1).nonzero().squeeze(-1) for e in range(module.num_experts)]
            first = [n for n, p in projections.items() if p.param != "down_proj"]
            down = [n for n, p in projections.items() if p.param == "down_proj"]
            for name in first:
                self.pruner.observe(name, hidden[routed[projections[name].index]], own=True)
            self._wait(first)
            for name in down:
                e = projections[name].index
                self.pruner.observe(name, expert_hidden(module, e, hidden[routed[e]]), own=True)
            self._wait(down)
        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _run_block(block: nn.Module, index: int, item: _Captured) -> Tensor:
    args, kwargs = item.args[index]
    out = block(item.hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_lockstep(block: nn.Module, index: int, captured: list[_Captured], pruner: _BlockPruner) -> list[Tensor]:
    """Run every micro-batch through the block as greenlets that meet at each linear; prune it when all arrived."""
    workers = [greenlet.greenlet(lambda item=item: ("done", _run_block(block, index, item))) for item in captured]
    outputs: list[Any] = [None] * len(workers)
    with pruner.hooks(sync=True):
        while True:
            events = []
            for k, worker in enumerate(workers):
                if worker.dead:
                    continue
                event = worker.switch()
                if event[0] == "done":
                    outputs[k] = event[1]
                events.append(event)
            if not events:
                break
            kinds = {e if e[0] == "sync" else ("done",) for e in events}
            if len(kinds) != 1:
                raise RuntimeError(f"micro-batches took different paths through block {index}: {kinds}")
            if events[0][0] == "sync":
                pruner.prune_all(list(events[0][1]))
    return outputs


def _capture_all(model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor], device: torch.device,
                 offload: Path | None, tag: str) -> list[_Captured]:
    """Capture every micro-batch; with `offload`, each goes to its own file at once, so memory holds one."""
    if offload is not None:
        offload.mkdir(parents=True, exist_ok=True)
    captured = []
    for k, chunk in enumerate(chunks):
        item = _capture(model, blocks, chunk.to(device), device)
        if offload is not None:
            item.offload(offload / f"{tag}-microbatch{k:05d}.safetensors")
        captured.append(item)
    return captured


def _capture(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, device: torch.device) -> _Captured:
    """Run the model up to its first block and record, for every block, the arguments the model passes it.

    Blocks are replaced by identities for this one call, so each block's own arguments (its mask type,
    its rotary embedding) are recorded without computing any block.
    """
    records: list[Any] = [None] * len(blocks)
    hidden: list[Tensor] = []

    def identity(i: int):
        def forward(*args, **kwargs):
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                hidden.append(x)
            records[i] = (rest, kwargs)
            if i == len(blocks) - 1:
                raise _Stop
            return x
        return forward

    for i, block in enumerate(blocks):
        block.forward = identity(i)
    restore = _outside_blocks_to(model, blocks, device)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for block in blocks:
            del block.forward
        restore()
    return _Captured(hidden[0], records)


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


def _outside_blocks_to(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move every parameter and buffer that is not inside the blocks to `device`; returns the undo."""
    moved: list[tuple[dict, str, Tensor]] = []

    def visit(module: nn.Module) -> None:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device != device and tensor.device.type != "meta":  # meta: streamed, unused
                    moved.append((store, name, tensor))
                    if isinstance(tensor, nn.Parameter):
                        store[name] = nn.Parameter(tensor.data.to(device), requires_grad=tensor.requires_grad)
                    else:
                        store[name] = tensor.to(device)
        for child in module.children():
            if child is not blocks:
                visit(child)

    visit(model)

    def undo() -> None:
        for store, name, tensor in moved:
            store[name] = tensor
    return undo
