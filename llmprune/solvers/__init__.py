"""Pruning solvers: one small file per method, one interface, one registry.

A solver holds statistics of a linear's inputs, never modules:
``add_batch(x)`` with x of shape [tokens, in_features] gathers them, and
``prune(W, sparsity, pattern)`` returns a new tensor shaped like W with zeros where pruned.
Linears that read the same input share one solver (one Hessian, one inverse). Under torch.distributed,
``reduce_(sum_)`` sums the statistics of every rank's share of the data before pruning.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern


class Solver(Protocol):
    needs_data: bool

    def add_batch(self, x: Tensor) -> None: ...

    def reduce_(self, sum_: Callable[[Tensor], Tensor]) -> None: ...

    def row_separable(self, pattern: Pattern) -> bool: ...

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor: ...


def _magnitude(columns: int, device: torch.device) -> Solver:
    from llmprune.solvers.magnitude import MagnitudeSolver

    return MagnitudeSolver()


def _wanda(columns: int, device: torch.device) -> Solver:
    from llmprune.solvers.wanda import WandaSolver

    return WandaSolver(columns, device)


def _sparsegpt(columns: int, device: torch.device) -> Solver:
    from llmprune.solvers.sparsegpt import SparseGPTSolver

    return SparseGPTSolver(columns, device)


SOLVERS: dict[str, Callable[[int, torch.device], Solver]] = {
    "magnitude": _magnitude,
    "wanda": _wanda,
    "sparsegpt": _sparsegpt,
}


def make_solver(method: str, columns: int, device: torch.device | str = "cpu", refine=None, first_window: int = 0) -> Solver:
    """A fresh solver for a linear (or group of linears) with `columns` inputs; `refine` (a DSnoTConfig)
    puts DSnoT after it. first_window: the index of the first calibration window this process will show it."""
    try:
        factory = SOLVERS[method]
    except KeyError:
        raise LlmpruneError(
            f"unknown method '{method}'; choose one of {', '.join(SOLVERS)}."
        ) from None
    solver = factory(columns, torch.device(device))
    if refine is not None:
        from llmprune.solvers.dsnot import RefinedSolver

        solver = RefinedSolver(solver, columns, torch.device(device), refine, first_window)
    return solver


def needs_data(method: str, refine=None) -> bool:
    """Whether the method (with its refinement) needs calibration inputs at all."""
    return refine is not None or make_solver(method, 1).needs_data
