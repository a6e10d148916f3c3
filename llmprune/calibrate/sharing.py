"""Sharing solves across torch.distributed ranks: whole solves go round-robin, or one solve's rows are split."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor

from llmprune.distributed import Dist
from llmprune.masks import Pattern
from llmprune.solvers import Solver

log = logging.getLogger(__name__)


def distribute(dist: Dist, jobs: list[Callable[[], tuple[list[Tensor], Any]]], templates: list[list[Tensor]],
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


def rows_shareable(dist: Dist, solver: Solver, weights: list[Tensor], pattern: Pattern) -> bool:
    """Whether the ranks can share one solve's rows: rows independent (Wanda, N:M), or a mask chosen over all rows
    that the ranks can choose together (SparseGPT unstructured), with at least a row for every rank."""
    rows = sum(W.shape[0] for W in weights)
    coupled = not solver.row_separable(pattern)
    return rows >= dist.world and (not coupled or solver.selects_across_rows)


def solve_rows(dist: Dist, solver: Solver, weights: list[Tensor], members: list[str], sparsities: list[float],
               pattern: Pattern, solve_slices) -> tuple[list[Tensor], list[dict | None]]:
    """One solve shared by the ranks: each prunes a contiguous share of the members' stacked rows, then every rank
    gets every row (for solvers whose rows are independent, this is the single-process result). Where the mask is
    chosen over all rows of a column block (SparseGPT unstructured), the ranks gather each block's scores and choose
    it together, the way one process would. solve_slices(slices, names, select) -> (weights, reports)."""
    offsets = [0]
    for W in weights:
        offsets.append(offsets[-1] + W.shape[0])
    spans = [Dist(r, dist.world).share(range(offsets[-1])) for r in range(dist.world)]
    spans = [(start, start + len(rows)) for start, rows in spans]
    lo, hi = spans[dist.rank]
    parts = [(k, max(lo, offsets[k]) - offsets[k], min(hi, offsets[k + 1]) - offsets[k]) for k in range(len(members))]
    parts = [(k, a, b) for k, a, b in parts if b > a]
    slices = [weights[k][a:b] for k, a, b in parts]
    names = [members[k] for k, _, _ in parts]
    log.debug("%s: rows %d:%d of %d solved here", members[0], lo, hi, offsets[-1])
    select = None
    if not solver.row_separable(pattern):
        from llmprune.solvers.sparsegpt import select_block

        sizes = [b - a for a, b in spans]

        def select(scores: Tensor, _bounds, _sparsities, i1: int, i2: int) -> Tensor:
            return select_block(dist.cat(scores, sizes, dim=1), offsets, sparsities, i1, i2)[:, lo:hi]
    local, reports = solve_slices(slices, names, select)
    stacked = torch.cat(local) if local else weights[0][:0].clone()
    gathered, all_reports = [], []
    for r, (a, b) in enumerate(spans):
        template = weights[0].new_empty((b - a, weights[0].shape[1]))
        gathered.append(dist.broadcast_(stacked.contiguous() if r == dist.rank else template, r))
        all_reports.append(dist.broadcast_object(list(zip([k for k, _, _ in parts], reports)), r))
    rows = torch.cat(gathered)
    W_new = [rows[offsets[k]:offsets[k + 1]] for k in range(len(members))]
    merged: list[dict | None] = [None] * len(members)
    for per_rank in all_reports:
        for k, report in per_rank:
            if report is not None:
                merged[k] = report if merged[k] is None else {key: merged[k][key] + report[key] for key in report}
    return W_new, merged
