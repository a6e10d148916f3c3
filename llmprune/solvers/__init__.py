"""Pruning solvers: one small file per method, one interface, one registry.

A solver holds statistics of a linear's inputs, never modules: ``add_batch(x)`` with x of shape
[tokens, in_features] gathers them, and ``prune(W, sparsity, pattern)`` returns a new tensor shaped like W
with zeros where pruned. Linears that read the same input share one solver (one Hessian, one inverse).
Under torch.distributed, ``reduce_(sum_)`` sums the statistics of every rank's share of the data before
pruning. `Solver` declares the whole interface with its defaults; every solver subclasses it.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern


class Solver:
    """The interface every solver implements, whole, with its defaults: the loop reads these attributes and calls
    these methods, never probes for them.

    needs_data: whether prune() uses calibration inputs (magnitude does not: the loop then runs no forward pass).
    solves_together: whether prune_many() does one solve for weights that read one input (SparseGPT's column loop
    over q/k/v stacked); otherwise the loop prunes them one by one.
    selects_across_rows: whether an unstructured mask compares rows with each other but can be chosen together by
    ranks that each hold some rows (prune_many's `select`).
    takes_squares: whether add_batch() accepts x² that a caller computed anyway (DSnoT beside Wanda).
    hessian: Σ x xᵀ (upper block triangle) where the solver keeps it, for DSnoT to borrow; None otherwise.
    gptq(): the SparseGPT statistics that GPTQ rounds this solver's weights with (quant.py), where the solver keeps
    them summed exactly (fp64: GPTQ's roundings must not depend on how batches were grouped); None otherwise (the
    caller then gathers its own).
    exact_option: whether the constructor takes `exact=True`, keeping the statistics fp64-summed so that gptq()
    returns them (one Hessian for the solve and the rounding, not a second one gathered beside it).
    """

    needs_data: ClassVar[bool] = True
    solves_together: ClassVar[bool] = False
    selects_across_rows: ClassVar[bool] = False
    takes_squares: ClassVar[bool] = False
    exact_option: ClassVar[bool] = False
    hessian: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        """Gather statistics of a batch of inputs, x: [..., in_features]."""

    def reduce_(self, sum_: Callable[[Tensor], Tensor]) -> None:
        """Sum the statistics over distributed ranks; `sum_` all-reduces a tensor in place."""

    def row_separable(self, pattern: Pattern) -> bool:
        """Whether rows pruned apart equal rows pruned together (so ranks may share a weight's rows)."""
        return True

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
        """A new tensor shaped like W ([out, in]) with zeros where pruned; W is not changed."""
        raise NotImplementedError

    def prune_many(self, weights: list[Tensor], sparsities: list[float], pattern: Pattern, select=None) -> list[Tensor]:
        """Prune weights that read this solver's input; `select` (see SparseGPT) only where selects_across_rows."""
        if select is not None:
            raise ValueError(f"{type(self).__name__} chooses no mask across rows; it takes no select")
        return [self.prune(W, s, pattern) for W, s in zip(weights, sparsities)]

    def gptq(self):
        """A SparseGPTSolver over this solver's Σ x xᵀ, for GPTQ to round with; None where it keeps none."""
        return None

    def take_reports(self, count: int) -> list[dict | None]:
        """What a refinement changed in the last `count` weights pruned (DSnoT), in order; None where nothing does."""
        return [None] * count


# name -> "module:class", imported on first use (a solver's module may be heavy)
SOLVERS: dict[str, str] = {
    "magnitude": "llmprune.solvers.magnitude:MagnitudeSolver",
    "wanda": "llmprune.solvers.wanda:WandaSolver",
    "sparsegpt": "llmprune.solvers.sparsegpt:SparseGPTSolver",
    "alps": "llmprune.solvers.alps:ALPSSolver",
    "admm": "llmprune.solvers.admm:ADMMSolver",
}


def solver_class(method: str) -> type[Solver]:
    import importlib

    try:
        module, _, name = SOLVERS[method].partition(":")
    except KeyError:
        raise LlmpruneError(f"unknown method '{method}'; choose one of {', '.join(SOLVERS)}.") from None
    return getattr(importlib.import_module(module), name)


def make_solver(method: str, columns: int, device: torch.device | str = "cpu", refine=None, first_window: int = 0,
                options: dict | None = None) -> Solver:
    """A fresh solver for a linear (or group of linears) with `columns` inputs; `refine` (a DSnoTConfig)
    puts DSnoT after it. first_window: the index of the first calibration window this process will show it.
    options: the solver's own settings (Recipe.solver_options)."""
    solver = solver_class(method)(columns, torch.device(device), **(options or {}))
    if refine is not None:
        from llmprune.solvers.dsnot import RefinedSolver

        solver = RefinedSolver(solver, columns, torch.device(device), refine, first_window)
    return solver


def needs_data(method: str, refine=None) -> bool:
    """Whether the method (with its refinement) needs calibration inputs at all."""
    return refine is not None or solver_class(method).needs_data
