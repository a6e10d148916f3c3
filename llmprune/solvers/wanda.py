"""Wanda: score |W_ij| * ||X_j||_2, compared within each output row (Sun et al. 2023, arXiv:2306.11695)."""
from __future__ import annotations

import torch
from torch import Tensor

from llmprune.masks import Pattern, select_mask
from llmprune.solvers import Solver


class WandaSolver(Solver):
    """Keeps the squared L2 norm of every input feature over all calibration tokens.

    Each batch's fp32 sums are accumulated in fp64, where adding them is exact in practice, so the norms (and
    the masks) do not depend on how the batches were grouped, e.g. across distributed ranks.
    """

    takes_squares = True  # add_batch can take x² from a caller that computes it anyway (DSnoT)

    def __init__(self, columns: int, device: torch.device):
        self.sq_norms = torch.zeros(columns, dtype=torch.float64, device=device)  # [in]
        self.tokens = 0

    def add_batch(self, x: Tensor, squares: Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        squares = x.square() if squares is None else squares.reshape(x.shape)
        self.sq_norms += squares.sum(0).double()
        self.tokens += x.shape[0]

    def reduce_(self, sum_) -> None:
        """Sum the statistics over distributed ranks; `sum_` all-reduces a tensor in place."""
        sum_(self.sq_norms)
        self.tokens = int(sum_(torch.tensor([self.tokens], device=self.sq_norms.device)).item())

    def scores(self, W: Tensor) -> Tensor:
        """|W_ij| · ‖X_j‖₂ ([out, in], fp32): Wanda's importance, also what OWL counts outliers of."""
        return W.abs().float() * self.sq_norms.sqrt().float()

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
        mask = select_mask(self.scores(W), sparsity, pattern, per_row=True)
        return W.masked_fill(mask, 0)
