"""Magnitude pruning: drop the smallest |W| (Zhu & Gupta 2017; the baseline of the SparseGPT and Wanda papers)."""
from __future__ import annotations

from torch import Tensor

from llmprune.masks import Pattern, select_mask
from llmprune.solvers import Solver


class MagnitudeSolver(Solver):
    """Needs no data: unstructured compares |W| across the whole matrix, N:M within each group."""

    needs_data = False

    def __init__(self, columns: int = 0, device=None):
        pass

    def row_separable(self, pattern: Pattern) -> bool:
        return pattern.structured  # unstructured compares the whole matrix

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
        # W: [out, in]
        mask = select_mask(W.abs().float(), sparsity, pattern, per_row=False)
        return W.masked_fill(mask, 0)
