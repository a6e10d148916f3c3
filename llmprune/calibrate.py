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

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import greenlet
import torch
from torch import Tensor, nn

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern
from llmprune.models import find_blocks, find_linears, get_weight, in_features, set_weight_
from llmprune.solvers import Solver, make_solver, needs_data

log = logging.getLogger(__name__)

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


@dataclass
class _Captured:
    hidden: Tensor  # [microbatch, seqlen, hidden]
    args: list[tuple[tuple, dict]]  # per block: the positional args after the hidden states, and kwargs


class _Stop(Exception):
    pass


def default_microbatch(seqlen: int) -> int:
    return max(1, TOKENS_PER_MICROBATCH // max(seqlen, 1))


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
) -> list[LinearResult]:
    """Prune every target linear of every decoder block in place; returns one result per linear.

    windows: [nsamples, seqlen] token ids (None for methods that need no data). sparsity may be a
    function of the linear's full name (per-layer allocation). refine: a DSnoTConfig to run DSnoT
    after the solver on every linear.
    """
    device = torch.device(device)
    sparsity_of = sparsity if callable(sparsity) else (lambda name, s=sparsity: s)
    blocks_name, blocks = find_blocks(model)
    _check_some_target(blocks_name, blocks, ignore, targets)
    results: list[LinearResult] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(blocks), desc="pruning", unit="block", disable=None, dynamic_ncols=True)
    with torch.no_grad():
        if not needs_data(method, refine):
            for i, block in enumerate(blocks):
                bar.set_postfix_str(f"block {i + 1}/{len(blocks)}: {method}")
                started = time.perf_counter()
                linears = find_linears(block, f"{blocks_name}.{i}", ignore, targets)
                for name, module in linears.items():
                    results.append(_prune_linear(make_solver(method, in_features(module), device), name, module,
                                                 sparsity_of(name), pattern, None))
                log.debug("block %d/%d pruned in %.2fs", i + 1, len(blocks), time.perf_counter() - started)
                bar.update()
            bar.close()
            return results
        if windows is None:
            raise ValueError(f"method {method} needs calibration windows")
        microbatch = microbatch or default_microbatch(windows.shape[1])
        captured = [_capture(model, blocks, chunk.to(device), device) for chunk in windows.split(microbatch)]
        shared: dict[str, list[str]] = {}  # the previous block's input-sharing groups, relative to the block
        for i, block in enumerate(blocks):
            started = time.perf_counter()
            bar.set_postfix_str(f"block {i + 1}/{len(blocks)}: {'calibrating + pruning' if sequential else 'gathering statistics'}")
            on_device = _to_device(block, device)
            prefix = f"{blocks_name}.{i}."
            predicted = {prefix + leader: [prefix + n for n in names] for leader, names in shared.items()}
            pruner = _BlockPruner(find_linears(block, prefix[:-1], ignore, targets), method, sparsity_of, pattern, device, predicted, refine)
            last = i == len(blocks) - 1
            if sequential:
                outputs = _run_lockstep(on_device, i, captured, pruner)
            else:
                with pruner.hooks(sync=False):
                    for item in captured:
                        _run_block(on_device, i, item)
                bar.set_postfix_str(f"block {i + 1}/{len(blocks)}: pruning")
                for name in list(pruner.order):
                    pruner.prune(name)
                bar.set_postfix_str(f"block {i + 1}/{len(blocks)}: propagating")
                outputs = None if last else [_run_block(on_device, i, item) for item in captured]
            shared = {leader[len(prefix):]: [n[len(prefix):] for n in names]
                      for leader, names in pruner.shared_groups().items()}
            missing = set(pruner.linears) - set(pruner.pruned)
            if missing:
                raise RuntimeError(f"linears never called by the block's forward: {sorted(missing)}")
            if outputs is not None:
                for item, out in zip(captured, outputs):
                    item.hidden = out
            if on_device is not block:
                _to_device(block, torch.device("cpu"))
            results.extend(pruner.results)
            log.info("block %d/%d: %d linears pruned in %.1fs", i + 1, len(blocks), len(pruner.results),
                     time.perf_counter() - started)
            bar.update()
    bar.close()
    return results


def _check_some_target(blocks_name: str, blocks, ignore: tuple[str, ...], targets: tuple[str, ...]) -> None:
    if not any(find_linears(block, f"{blocks_name}.{i}", ignore, targets) for i, block in enumerate(blocks)):
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
) -> tuple[list[float], list[int]]:
    """OWL's statistics of the dense model: each block's outlier ratio of Wanda scores, and its number of
    prunable weights. One forward pass through the dense blocks."""
    from llmprune.allocation import outlier_ratio

    device = torch.device(device)
    blocks_name, blocks = find_blocks(model)
    _check_some_target(blocks_name, blocks, ignore, targets)
    microbatch = microbatch or default_microbatch(windows.shape[1])
    ratios, sizes = [], []
    from tqdm.auto import tqdm

    with torch.no_grad():
        captured = [_capture(model, blocks, chunk.to(device), device) for chunk in windows.split(microbatch)]
        for i, block in enumerate(tqdm(blocks, desc="outlier ratios", unit="block", disable=None, dynamic_ncols=True)):
            on_device = _to_device(block, device)
            linears = find_linears(block, f"{blocks_name}.{i}", ignore, targets)
            sq_norms: dict[str, Tensor] = {}

            def gather(name: str):
                def hook(module, args):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    sq_norms[name] = sq_norms.get(name, 0) + x.square().sum(0)
                return hook

            handles = [module.register_forward_pre_hook(gather(name)) for name, module in linears.items()]
            try:
                outputs = [_run_block(on_device, i, item) for item in captured]
            finally:
                for handle in handles:
                    handle.remove()
            for item, out in zip(captured, outputs):
                item.hidden = out
            scores = [get_weight(module).abs().float() * sq_norms[name].sqrt() for name, module in linears.items()]
            ratios.append(outlier_ratio(scores, m) if scores else 0.0)
            sizes.append(sum(s.numel() for s in scores))
            if on_device is not block:
                _to_device(block, torch.device("cpu"))
            log.info("block %d/%d: outlier ratio %.4f", i + 1, len(blocks), ratios[-1])
    return ratios, sizes


def _prune_linear(solver: Solver, name: str, module: nn.Module, sparsity: float, pattern: Pattern,
                  leader: str | None) -> LinearResult:
    started = time.perf_counter()
    W_new = solver.prune(get_weight(module), sparsity, pattern)
    return _apply(name, module, W_new, sparsity, time.perf_counter() - started, leader)


def _apply(name: str, module: nn.Module, W_new: Tensor, target: float, seconds: float, leader: str | None) -> LinearResult:
    set_weight_(module, W_new)
    zeros = W_new.numel() - int(torch.count_nonzero(W_new))
    return LinearResult(name, tuple(W_new.shape), zeros / W_new.numel(), target, seconds, leader)


class _BlockPruner:
    """Hooks that feed a block's linears to their solvers; linears reading the same tensor share one solver.

    Linears that share a solver are pruned together in one solve when the solver supports it
    (``prune_many``). In the sequential schedule the group is not known yet when its first linear must
    be pruned, so it is predicted from the previous block; a member's stashed result is used only once
    its own input has been seen to be the leader's, and recomputed otherwise.
    """

    def __init__(self, linears: dict[str, nn.Module], method: str, sparsity_of, pattern: Pattern, device,
                 predicted: dict[str, list[str]] | None = None, refine=None):
        self.linears = linears
        self.refine = refine
        self.method, self.sparsity_of, self.pattern, self.device = method, sparsity_of, pattern, device
        self.predicted = predicted or {}  # leader name -> the other linears expected to share its input
        self.groups: dict[str, tuple[Solver, str]] = {}  # linear name -> (solver, name of the group's first linear)
        self._by_input: dict[tuple, tuple[Solver, str, Tensor]] = {}
        self._stashed: dict[str, tuple[Solver, Tensor, float, dict | None]] = {}
        self.order: list[str] = []
        self.pruned: set[str] = set()
        self.results: list[LinearResult] = []

    def observe(self, name: str, x: Tensor) -> None:
        if name in self.pruned:
            return
        group = self.groups.get(name)
        if group is None:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.storage_offset(), x._version, x.dtype)
            shared = self._by_input.get(key)
            if shared is None:
                solver = make_solver(self.method, x.shape[-1], self.device, self.refine)
                self._by_input[key] = (solver, name, x)  # holding x keeps its address from being reused
                group = (solver, name)
            else:
                group = (shared[0], shared[1])
            self.groups[name] = group
            self.order.append(name)
        solver, leader = group
        if leader == name:
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
        if name in self.pruned:
            return
        solver, leader = self.groups[name]
        shared_with = None if leader == name else leader
        stashed = self._stashed.pop(name, None)
        if stashed is not None and stashed[0] is solver:
            self._finish(name, *stashed[1:3], shared_with, stashed[3])
            return
        members = [name]
        if leader == name and hasattr(solver, "prune_many"):
            observed = [n for n, g in self.groups.items() if g[1] == name and n != name]
            expected = [n for n in self.predicted.get(name, []) if n in self.linears and n not in self.groups]
            members += [n for n in observed + expected if n not in self.pruned]
        started = time.perf_counter()
        if len(members) == 1:
            W_new = [solver.prune(get_weight(self.linears[name]), self.sparsity_of(name), self.pattern)]
        else:
            W_new = solver.prune_many([get_weight(self.linears[n]) for n in members],
                                      [self.sparsity_of(n) for n in members], self.pattern)
        seconds = time.perf_counter() - started
        rows = sum(W.shape[0] for W in W_new)
        reports = getattr(solver, "reports", None)
        refined = [reports.pop(0) for _ in W_new] if reports else [None] * len(W_new)
        for member, W, refine in zip(members, W_new, refined):
            share = seconds * W.shape[0] / rows
            if member == name:
                self._finish(name, W, share, shared_with, refine)
            else:
                self._stashed[member] = (solver, W, share, refine)

    def _finish(self, name: str, W_new: Tensor, seconds: float, shared_with: str | None, refine: dict | None) -> None:
        result = _apply(name, self.linears[name], W_new, self.sparsity_of(name), seconds, shared_with)
        result.refine = refine
        self.results.append(result)
        self.pruned.add(name)

    def hooks(self, sync: bool):
        return _Hooks(self, sync)


class _Hooks:
    def __init__(self, pruner: _BlockPruner, sync: bool):
        self.pruner, self.sync, self.handles = pruner, sync, []

    def __enter__(self):
        for name, module in self.pruner.linears.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, args):
            self.pruner.observe(name, args[0])
            if self.sync and name not in self.pruner.pruned:
                greenlet.getcurrent().parent.switch(("sync", name))
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
                pruner.prune(events[0][1])
    return outputs


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


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    if next(module.parameters()).device == device:
        return module
    return module.to(device)


def _outside_blocks_to(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move every parameter and buffer that is not inside the blocks to `device`; returns the undo."""
    moved: list[tuple[dict, str, Tensor]] = []

    def visit(module: nn.Module) -> None:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device != device:
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
