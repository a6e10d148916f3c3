"""SparseGPT: prune with second-order weight reconstruction (Frantar & Alistarh 2023, arXiv:2301.00774).

Columns are processed left to right in blocks; the error of each pruned column is spread over the
remaining columns through the Cholesky factor of the inverse Hessian H = 2 X Xᵀ / n, with lazy
batched updates between blocks and the mask chosen adaptively per block of columns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llmprune.masks import Pattern, lowest_k, select_mask

BLOCKSIZE = 128  # columns per lazy-update block (paper default)
PERCDAMP = 0.01  # dampening: 0.01 × mean diag(H) (paper default)


class SparseGPTSolver:
    """Accumulates the Hessian in fp32; its inverse is computed once and shared by every linear that reads the same input."""

    needs_data = True

    def __init__(self, columns: int, device: torch.device, blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # [in, in]
        self.tokens = 0
        self.blocksize = blocksize
        self.percdamp = percdamp
        self._factor: tuple[Tensor, Tensor] | None = None

    def add_batch(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.H.addmm_(x.T, x)
        self.tokens += x.shape[0]
        self._factor = None

    def _inverse_factor(self) -> tuple[Tensor, Tensor]:
        """Upper Cholesky factor of H⁻¹ (dampened), and the mask of dead inputs (never non-zero)."""
        if self._factor is None:
            H = self.H * (2.0 / max(self.tokens, 1))
            dead = torch.diagonal(H) == 0
            H[dead, dead] = 1.0
            H.diagonal().add_(self.percdamp * torch.diagonal(H).mean())
            L = torch.linalg.cholesky(H)
            Hinv = torch.cholesky_inverse(L)
            self._factor = (torch.linalg.cholesky(Hinv, upper=True), dead)
        return self._factor

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
        if sparsity == 0 and not pattern.structured:
            return W.clone()
        U, dead = self._inverse_factor()  # U: [in, in], upper
        W_out = W.float().clone()  # [out, in]
        W_out[:, dead] = 0
        rows, cols = W_out.shape
        bs = max(self.blocksize // pattern.m, 1) * pattern.m if pattern.structured else self.blocksize
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W_out[:, i1:i2].clone()  # [out, b]
            U1 = U[i1:i2, i1:i2]  # [b, b]
            d1 = torch.diagonal(U1)  # [b]
            Err1 = torch.zeros_like(W1)
            if pattern.structured:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                # cumulative rounding keeps the whole matrix at exactly round(sparsity × numel) zeros
                k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
                mask1 = lowest_k((W1.square() / d1.square()).reshape(1, -1), k).view_as(W1)
            for i in range(i2 - i1):
                if pattern.structured and i % pattern.m == 0:
                    group = slice(i, i + pattern.m)
                    mask1[:, group] = select_mask(W1[:, group].square() / d1[group].square(), 0.0, pattern)
                w = W1[:, i]
                q = w.masked_fill(mask1[:, i], 0)
                err = (w - q) / d1[i]  # [out]
                W1[:, i + 1 :].sub_(err.unsqueeze(1) * U1[i, i + 1 :].unsqueeze(0))
                W1[:, i] = q
                Err1[:, i] = err
            W_out[:, i1:i2] = W1
            W_out[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
        return W_out.to(W.dtype)
