"""A block's linears fed to their solvers and pruned: the hooks that show each linear its inputs (and, in
lockstep, pause the micro-batch there), the grouping of linears that read one input under one solver, and the
solves (round-robin or row-shared across ranks)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import greenlet
import torch
from torch import Tensor, nn

from llmprune.calibrate.sharing import distribute, rows_shareable, solve_rows
from llmprune.distributed import SINGLE, Dist
from llmprune.masks import Pattern
from llmprune.models import ExpertProjection, expert_hidden, get_weight, in_features, routing, set_weight_
from llmprune.quant import attach_expert_quantization_, attach_quantization_, rounded_to_nearest
from llmprune.solvers import Solver, make_solver, solver_class
from llmprune.solvers.sparsegpt import SparseGPTSolver

FALLBACK = "magnitude"  # for experts that saw fewer calibration tokens than their input width


@dataclass
class LinearResult:
    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of zeros after pruning
    target: float  # the sparsity asked for
    seconds: float
    shares_statistics_with: str | None = None
    refine: dict | None = None  # what DSnoT changed: rows refined, swaps, output error before and after
    tokens: int | None = None  # calibration tokens routed to this expert projection (experts only)
    fallback: str | None = None  # the method used instead, for an expert that saw too few tokens
    quantized: str | None = None  # the scheme GPTQ rounded it to, e.g. w4a16 g128 symmetric


def apply(name: str, module: nn.Module, W_new: Tensor, target: float, seconds: float, leader: str | None) -> LinearResult:
    set_weight_(module, W_new)
    zeros = W_new.numel() - int(torch.count_nonzero(W_new != 0))  # 4× faster than counting the floats (measured)
    return LinearResult(name, tuple(W_new.shape), zeros / W_new.numel(), target, seconds, leader)


class BlockPruner:
    """Hooks that feed a block's linears to their solvers; linears reading the same tensor share one solver.

    Linears that share a solver are pruned together in one solve when the solver `solves_together`. In the
    sequential schedule the group is not known yet when its first linear must be pruned, so it is predicted from
    the previous block; a member's stashed result is used only once its own input has been seen to be the leader's,
    and recomputed otherwise. Under torch.distributed a solver's statistics are summed over the ranks before its
    first solve, and solves go round-robin.
    """

    def __init__(self, linears: dict[str, nn.Module], method: str, sparsity_of: Callable[[str], float], pattern: Pattern,
                 device, predicted: dict[str, list[str]] | None = None, refine=None, dist: Dist = SINGLE,
                 first_window: int = 0, solver_options: dict | None = None, quantize=None):
        self.linears = linears
        self.refine, self.solver_options = refine, solver_options or {}
        self.scheme = quantize  # a quant.QuantScheme: every pruned weight then rounded by GPTQ, keeping its zeros
        if quantize is not None:
            quantize.check_linears(linears)
        self._rounders: dict[int, SparseGPTSolver] = {}  # solver id -> GPTQ's statistics, where the solver keeps none
        self.method, self.sparsity_of, self.pattern, self.device = method, sparsity_of, pattern, device
        self.dist, self.first_window = dist, first_window
        self.predicted = predicted or {}  # leader name -> the other linears expected to share its input
        self.groups: dict[str, tuple[Solver, str]] = {}  # linear name -> (solver, name of the group's first linear)
        self._by_input: dict[tuple, tuple[Solver, str, Tensor]] = {}
        self._stashed: dict[str, tuple] = {}  # member -> (solver, weight, seconds, DSnoT report, quant.Quantized or None)
        self._reduced: set[int] = set()  # ids of solvers whose statistics are summed over ranks
        self._solves = 0
        self.tokens: dict[str, int] = {}  # tokens each expert projection saw (on this rank until summed)
        self.fallback: dict[str, str] = {}
        self.order: list[str] = []
        self.pruned: set[str] = set()
        self.results: list[LinearResult] = []

    def _new_solver(self, columns: int) -> Solver:
        options = self.solver_options
        if self.scheme is not None and solver_class(self.method).exact_option:
            options = {**options, "exact": True}  # the solve's own Hessian, fp64-summed, is the one GPTQ rounds with
        solver = make_solver(self.method, columns, self.device, self.refine, self.first_window, options)
        if self.scheme is not None and solver.gptq() is None:
            self._rounders[id(solver)] = SparseGPTSolver(columns, torch.device(self.device), exact=True)
        return solver

    def _rounder(self, solver: Solver) -> SparseGPTSolver:
        """The statistics GPTQ rounds a solver's weights with: its own, or those gathered beside it."""
        return self._rounders.get(id(solver)) or solver.gptq()

    def observe(self, name: str, x: Tensor, own: bool = False) -> None:
        """Show linear `name` an input batch; own=True gives it a solver of its own (an expert's routed tokens)."""
        if name in self.pruned:
            return
        group = self.groups.get(name)
        if group is None:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.storage_offset(), x._version, x.dtype)
            shared = None if own else self._by_input.get(key)
            if own:
                group = (self._new_solver(x.shape[-1]), name)
            elif shared is None:
                solver = self._new_solver(x.shape[-1])
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
            if id(solver) in self._rounders:
                self._rounders[id(solver)].add_batch(x)

    def shared_groups(self) -> dict[str, list[str]]:
        """Leader -> the other linears that read the same input, as observed."""
        groups: dict[str, list[str]] = {}
        for name in self.order:
            leader = self.groups[name][1]
            if leader != name:
                groups.setdefault(leader, []).append(name)
        return groups

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
                self._finish(name, *stashed[1:3], None if leader == name else leader, *stashed[3:])
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
                if id(solver) in self._rounders:
                    self._rounders[id(solver)].reduce_(self.dist.sum_)
                self._reduced.add(id(solver))
        self._fallbacks(plans)
        weights = [[get_weight(self.linears[m]) for m in members] for _, _, members in plans]
        if self.dist.active and len(plans) < self.dist.world and all(
                rows_shareable(self.dist, solver, W, self.pattern) for (_, solver, _), W in zip(plans, weights)):
            solved = [self._solve_rows(solver, members) for _, solver, members in plans]  # too few solves to go round
        else:
            jobs = [(lambda solver=solver, members=members: self._solve(solver, members)) for _, solver, members in plans]
            solved = distribute(self.dist, jobs, weights, offset=self._solves)
            self._solves += len(jobs)
        for (name, solver, members), (W_new, (seconds, refined)) in zip(plans, solved):
            leader = self.groups[name][1]
            rows = sum(W.shape[0] for W in W_new)
            quantized = [None] * len(W_new)
            if self.scheme is not None:  # every rank rounds every weight (deterministic: the same on each), stacked
                started = time.perf_counter()
                if name in self.fallback:  # too few tokens for a Hessian (GPTQ would zero its dead inputs): to nearest
                    quantized = [rounded_to_nearest(W, self.scheme) for W in W_new]
                else:
                    # GPTQ rounds the weight before pruning with the mask fixed, so its error feedback makes up for
                    # the pruning as well as the rounding, then descent refits the codes towards it (quant.py's
                    # docstring has the measurements)
                    rounder, before = self._rounder(self.groups[name][0]), [get_weight(self.linears[m]) for m in members]
                    masks = [W == 0 for W in W_new]
                    quantized = rounder.quantize_many(before, masks, self.scheme, self.scheme.actorder)
                    quantized = rounder.descend_many(quantized, before, masks, self.scheme, self.scheme.passes)
                W_new, seconds = [q.weight for q in quantized], seconds + time.perf_counter() - started
            for member, W, refine, q in zip(members, W_new, refined, quantized):
                share = seconds * W.shape[0] / rows
                if member == name:
                    self._finish(name, W, share, None if leader == name else leader, refine, q)
                else:
                    self._stashed[member] = (solver, W, share, refine, q)
        for name in names:  # members solved with an earlier name of this call
            stashed = self._stashed.get(name)
            if name not in self.pruned and stashed is not None and name in planned and stashed[0] is self.groups[name][0]:
                del self._stashed[name]
                self._finish(name, *stashed[1:3], self.groups[name][1], *stashed[3:])

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

    def _solve_rows(self, solver: Solver, members: list[str]):
        started = time.perf_counter()
        W_new, reports = solve_rows(self.dist, solver, [get_weight(self.linears[m]) for m in members], members,
                                    [self.sparsity_of(m) for m in members], self.pattern,
                                    lambda slices, names, select: self._solve_slices(solver, slices, names, select))
        return W_new, (time.perf_counter() - started, reports)

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

    def _finish(self, name: str, W_new: Tensor, seconds: float, shared_with: str | None, refine: dict | None,
                quantized=None) -> None:
        """Put a pruned (and, with quantized, rounded: quant.Quantized) weight into its linear and record it."""
        result = apply(name, self.linears[name], W_new, self.sparsity_of(name), seconds, shared_with)
        if quantized is not None:
            module = self.linears[name]
            if isinstance(module, ExpertProjection):
                attach_expert_quantization_(module.experts, module.param, module.index, quantized)
            else:
                attach_quantization_(module, quantized)
            result.quantized = self.scheme.describe()
        result.refine = refine
        result.tokens, result.fallback = self.tokens.get(name), self.fallback.get(name)
        self.results.append(result)
        self.pruned.add(name)

    def hooks(self, sync: bool) -> "Hooks":
        return Hooks(self, sync)


class Hooks:
    """Forward pre-hooks that show each linear's input to an observer (a BlockPruner, or OWL's Wanda statistics);
    in lockstep they also pause the micro-batch until every micro-batch has arrived and the linear is pruned. A
    fused experts module gets one hook that shows each expert the tokens routed to it: first to its first
    projections, then (once those are pruned) what its down projections read."""

    def __init__(self, observer, sync: bool):
        self.observer, self.sync, self.handles = observer, sync, []

    def __enter__(self):
        experts: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, module in self.observer.linears.items():
            if isinstance(module, ExpertProjection):
                experts.setdefault(id(module.experts), (module.experts, []))[1].append(name)
            else:
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        for module, names in experts.values():
            self.handles.append(module.register_forward_pre_hook(self._experts_hook(names), with_kwargs=True))
        return self

    def _wait(self, names: list[str]) -> None:
        waiting = tuple(n for n in names if n not in self.observer.pruned)
        if self.sync and waiting:
            greenlet.getcurrent().parent.switch(("sync", waiting))

    def _hook(self, name: str):
        def hook(module, args):
            self.observer.observe(name, args[0])
            self._wait([name])
        return hook

    def _experts_hook(self, names: list[str]):
        projections = {name: self.observer.linears[name] for name in names}

        def hook(module, args, kwargs):
            hidden, index, _ = routing(module, args, kwargs)
            routed = [(index == e).any(-1).nonzero().squeeze(-1) for e in range(module.num_experts)]
            first = [n for n, p in projections.items() if p.param != "down_proj"]
            down = [n for n, p in projections.items() if p.param == "down_proj"]
            for name in first:
                self.observer.observe(name, hidden[routed[projections[name].index]], own=True)
            self._wait(first)
            for name in down:
                e = projections[name].index
                self.observer.observe(name, expert_hidden(module, e, hidden[routed[e]]), own=True)
            self._wait(down)
        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False
