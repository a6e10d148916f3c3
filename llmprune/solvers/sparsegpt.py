"""SparseGPT: prune with second-order weight reconstruction (Frantar & Alistarh 2023, arXiv:2301.00774).

Columns are processed left to right in blocks; the error of each pruned column is spread over the
remaining columns through the Cholesky factor of the inverse Hessian H = 2 X Xᵀ / n, with lazy
batched updates between blocks and the mask chosen adaptively per block of columns (per group of M
columns for N:M). The weight is worked on transposed, so that a column is a contiguous row and each
step is a single rank-1 update: the loop is bound by per-operation overhead, not arithmetic.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llmprune.masks import Pattern, lowest_k
from llmprune.quant import ColumnQuantizer, Quantized, descend_codes
from llmprune.solvers import Solver

BLOCKSIZE = 128  # columns per lazy-update block (paper default)
PERCDAMP = 0.01  # dampening: 0.01 × mean diag(H) (paper default)
SUBBLOCK = 32  # columns updated one by one inside a block; the rest of the block gets one product (measured)


def row_block(columns: int) -> int:
    """Rows of H per add_upper_ product: about four row blocks, measured fastest on 576 and 1536 inputs."""
    return max(128, -(-columns // 4 // 64) * 64)


def add_upper_(H: Tensor, x: Tensor, step: int) -> None:
    """H += xᵀx on H's upper block triangle only (H is symmetric; about 35% fewer flops than x.T @ x)."""
    for i in range(0, x.shape[1], step):
        H[i : i + step, i:].addmm_(x[:, i : i + step].T, x[:, i:])


def add_upper_exact_(H: Tensor, batch: Tensor | None, x: Tensor, step: int) -> Tensor:
    """H (fp64) += xᵀx on its upper block triangle: the batch's product in fp32 (in `batch`, reused; returned), summed
    in fp64, where adding batches is exact in practice, so H does not depend on how the batches were grouped (over
    torch.distributed ranks, for one). Only the upper blocks are written and added (beta=0 overwrites them, so the
    buffer is never cleared): on 2048 inputs and 512 tokens 8.8 ms a batch against 16.3 ms clearing and adding the
    whole square (fp32 alone: 6.9 ms; Xeon, 2 threads), the same sums bit for bit."""
    if batch is None:
        batch = torch.empty(H.shape, dtype=torch.float32, device=H.device)
    for i in range(0, x.shape[1], step):
        block = batch[i : i + step, i:]
        block.addmm_(x[:, i : i + step].T, x[:, i:], beta=0)
        H[i : i + step, i:] += block
    return batch


LAPACK_UP_TO = 640  # inverse_cholesky hands matrices up to this size to LAPACK whole (measured faster up to 576)


def inverse_cholesky(M: Tensor) -> Tensor:
    """L⁻¹ for the lower Cholesky factor L of the symmetric positive definite M (M = L·Lᵀ).

    Blocked by halves: with M = [[A, Bᵀ], [B, C]], A = L₁₁L₁₁ᵀ, L₂₁ = B·L₁₁⁻ᵀ, C − L₂₁L₂₁ᵀ = L₂₂L₂₂ᵀ, and
    L⁻¹ = [[L₁₁⁻¹, 0], [−L₂₂⁻¹·L₂₁·L₁₁⁻¹, L₂₂⁻¹]]: the work is matrix products, where a factorization
    followed by a triangular solve against the identity spends most of its time (2.1× slower on 1536 inputs
    with 2 CPU threads, measured; the same accuracy against a float64 result)."""
    n = M.shape[0]
    if n <= LAPACK_UP_TO:
        L = torch.linalg.cholesky(M)
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=M.dtype, device=M.device), upper=False)
    h = n // 2 // 64 * 64
    inv11 = inverse_cholesky(M[:h, :h])
    L21 = M[h:, :h] @ inv11.T
    inv22 = inverse_cholesky(M[h:, h:] - L21 @ L21.T)
    out = M.new_zeros(n, n)
    out[:h, :h] = inv11
    out[h:, h:] = inv22
    out[h:, :h] = -(inv22 @ (L21 @ inv11))
    return out


def symmetric(upper_blocks: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The full symmetric matrix, in `dtype` (default: its own), from one whose upper triangle (at least) is filled.
    Converted first and mirrored in place: one pass over the fp64 sums, the rest in fp32 (2.7× faster than mirroring
    in fp64 on 2048 inputs, the same values: mirroring only copies)."""
    full = upper_blocks.to(dtype or upper_blocks.dtype, copy=True).triu_()
    return full.add_(full.T.tril(-1))


class SparseGPTSolver(Solver):
    """Accumulates the Hessian in fp32; its inverse is computed once and shared by every linear that reads the same input."""

    solves_together = True  # q/k/v (or gate/up) stacked: one pass of the column loop
    # the unstructured mask of a column block is chosen over all its rows: rows can still be split (across processes)
    # when the caller passes a `select` that chooses over every row
    selects_across_rows = True
    exact_option = True

    def __init__(self, columns: int, device: torch.device, blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP,
                 exact: bool = False):
        # [in, in], upper block triangle; exact: summed in fp64 (add_upper_exact_), the same over any grouping of the
        # batches, as GPTQ needs (one rounding that flips moves every later column of its row)
        self.H = torch.zeros(columns, columns, dtype=torch.float64 if exact else torch.float32, device=device)
        self._batch: Tensor | None = None
        self._row_block = row_block(columns)
        self.tokens = 0
        self.blocksize = blocksize
        self.percdamp = percdamp
        self._factor: dict[bool, tuple] | None = None  # ordered? -> (U, dead inputs, order)

    def add_batch(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        if self.H.dtype == torch.float64:
            self._batch = add_upper_exact_(self.H, self._batch, x, self._row_block)
        else:
            add_upper_(self.H, x, self._row_block)
        self.tokens += x.shape[0]
        self._factor = None

    @classmethod
    def from_hessian(cls, H: Tensor, tokens: int) -> "SparseGPTSolver":
        """A solver over statistics gathered elsewhere (H = Σ x xᵀ, at least its upper block triangle, fp32)."""
        solver = cls(0, H.device)
        solver.H, solver.tokens, solver._row_block = H, tokens, row_block(H.shape[0])
        return solver

    @property
    def hessian(self) -> Tensor:
        return self.H.float()

    def gptq(self) -> "SparseGPTSolver | None":
        return self if self.H.dtype == torch.float64 else None

    def row_separable(self, pattern: Pattern) -> bool:
        return pattern.structured

    def reduce_(self, sum_) -> None:
        """Sum the statistics over distributed ranks; `sum_` all-reduces a tensor in place."""
        sum_(self.H)
        self.tokens = int(sum_(torch.tensor([self.tokens], device=self.H.device)).item())
        self._factor = None

    def _inverse_factor(self, ordered: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Upper Cholesky factor of H⁻¹ (dampened), the mask of dead inputs (never non-zero), and with `ordered` the
        inputs' order by descending diag(H) (GPTQ's activation order) that the factor is of (None: their own)."""
        if self._factor is None:
            self._factor = {}
        if ordered not in self._factor:
            self._batch = None
            H, dead = self.dampened_hessian()
            order = None
            if ordered:
                order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
                H = H[order][:, order]
            # The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) is J·L⁻¹·J, where J reverses the order of the
            # inputs and L is the lower Cholesky factor of J·H·J: one factorization and one triangular
            # inverse instead of the reference's factorize, invert, factorize again.
            U = inverse_cholesky(H.flip(0, 1)).flip(0, 1)
            self._factor[ordered] = (U, dead, order)
        return self._factor[ordered]

    def dampened_hessian(self) -> tuple[Tensor, Tensor]:
        """H = 2 X Xᵀ / n in fp32 with a dead input's diagonal set to 1 and 0.01 × mean diag(H) added to the diagonal
        (the paper's dampening; the mean taken after the dead inputs' ones, as the reference code does), and the mask
        of dead inputs."""
        H = symmetric(self.H, torch.float32).mul_(2.0 / max(self.tokens, 1))
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        H.diagonal().add_(self.percdamp * torch.diagonal(H).mean())
        return H, dead

    def descend_many(self, quantized: list, targets: list[Tensor], masks: list[Tensor], scheme, passes: int) -> list:
        """quant.descend_codes with this solver's dampened Hessian: GPTQ's codes improved towards `targets` (the weights
        before pruning), masks (bool, True = pruned) kept at 0. Rows are independent, so the weights that read this
        input (q/k/v, gate/up) go through one column loop stacked, as in quantize_many."""
        if passes <= 0:
            return quantized
        H, _ = self.dampened_hessian()
        parts = [torch.cat(p) for p in zip(*((q.weight, q.codes, q.scale, q.zero) for q in quantized))]
        done = descend_codes(Quantized(*parts), torch.cat(targets), torch.cat(masks), H, scheme, passes)
        bounds = [0]
        for q in quantized:
            bounds.append(bounds[-1] + q.codes.shape[0])
        return [Quantized(*(t[r1:r2] for t in (done.weight, done.codes, done.scale, done.zero)))
                for r1, r2 in zip(bounds, bounds[1:])]

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
        return self._prune_stacked([W], [sparsity], pattern)[0]

    def prune_many(self, weights: list[Tensor], sparsities: list[float], pattern: Pattern, select=None) -> list[Tensor]:
        """Prune several weights that read this solver's input (q/k/v, gate/up) in one column loop.

        Rows are independent given the mask, so stacking the weights' rows gives each the result of
        pruning it alone (up to float summation order), for a single pass of the per-column loop. Masks
        are still chosen per weight.

        select(scores, bounds, sparsities, i1, i2) -> mask chooses the unstructured mask of columns i1:i2
        ([i2 - i1, rows] scores of the stacked weights, weight k in rows bounds[k]:bounds[k + 1]); the default
        is `select_block`. Processes that each hold some of the rows pass one that chooses over all of them.
        """
        return self._prune_stacked(weights, sparsities, pattern, select)

    def quantize_many(self, weights: list[Tensor], masks: list[Tensor], scheme, actorder: bool = True) -> list:
        """GPTQ keeping a mask: round each weight to the scheme's grid (quant.py) column by column, spreading each
        column's rounding error over the columns not yet reached through this solver's inverse Hessian factor;
        where masks (bool, True = pruned, one per weight) are set the weight is 0 instead, its error spread the
        same way, so the zeros stay zeros. actorder: columns in descending order of diag(H), with every group's
        scales chosen beforehand from the weight as given (GPTQ's activation order with static groups, as
        llm-compressor's default `actorder: static`: the checkpoint needs no column permutation). Returns a
        quant.Quantized per weight."""
        if any(M.shape != W.shape for W, M in zip(weights, masks)):
            raise ValueError("every mask must be shaped like its weight")
        return self._prune_stacked(weights, [0.0] * len(weights), Pattern(), None, scheme, masks, actorder)

    def _prune_stacked(self, weights: list[Tensor], sparsities: list[float], pattern: Pattern, select=None,
                       scheme=None, masks=None, actorder: bool = False) -> list:
        if scheme is None and all(s == 0 for s in sparsities) and not pattern.structured and select is None:
            return [W.clone() for W in weights]
        U, dead, perm = self._inverse_factor(actorder)  # U: [in, in], upper (of the inputs in the order `perm`)
        WT, bounds = _stack(weights)  # [in, out...]: a column of the weights is a contiguous row here
        WT[dead] = 0
        cols = WT.shape[0]
        fixed = None if masks is None else _stack(masks)[0].bool()
        quantizer = None if scheme is None else ColumnQuantizer(scheme, cols, WT.shape[1], WT.device, weights[0].dtype,
                                                                torch.diagonal(self.H).float())
        group_of = None  # with an order: the group of each input as reached, whose scales are chosen beforehand
        if perm is not None:
            quantizer.choose_all(WT, fixed)
            group_of = (perm // quantizer.g).tolist()
            WT, fixed = WT[perm], fixed[perm]
        m = pattern.m
        bs = max(self.blocksize // m, 1) * m if pattern.structured else self.blocksize
        sub = max(SUBBLOCK // m, 1) * m if pattern.structured else SUBBLOCK
        choose_groups = pattern.structured
        # nothing pruned (GPTQ alone): no column needs its pruned positions zeroed after rounding
        any_pruned = choose_groups or fixed is None or bool(fixed.any())
        kernel = None
        if quantizer is not None and not choose_groups and WT.device.type == "cpu" and WT.dtype == torch.float32:
            from llmprune.cpu_kernels import gptq_extension

            kernel = gptq_extension()
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            b = i2 - i1
            W1 = WT[i1:i2]  # view [b, out]
            U1 = U[i1:i2, i1:i2]
            d1 = torch.diagonal(U1).unsqueeze(1)  # [b, 1]
            # scale = mask / d (zero where kept): the error of column i is W1[i] * scale[i]
            if choose_groups:
                scale = torch.zeros_like(W1)
                inv_d1 = 1.0 / d1
            else:
                mask = fixed[i1:i2] if fixed is not None else (select or select_block)(W1.square() / d1.square(), bounds,
                                                                                          sparsities, i1, i2)
                scale = mask / d1
            Err1 = torch.empty_like(W1)
            if quantizer is not None:  # ŵ of the block's columns, and the error of rounding (or pruning) each
                Q1 = torch.empty_like(W1)
                inv_d1 = 1.0 / d1
                keep = (scale == 0).float() if any_pruned else None
            if kernel is not None:  # the same loop compiled (kernels/gptq_cpu.cpp): rounding, errors, rank-1 updates
                _columns_compiled(kernel, quantizer, WT, W1, U1, Q1, Err1, inv_d1, keep, fixed, group_of, i1, sub)
            else:
                # Each column's error is spread over the rest of its sub-block with one rank-1 update, and
                # over the rest of the block with one matrix product per sub-block. Row i is final once
                # reached, so the zeros are written after the loop.
                for j1 in range(0, b, sub):
                    j2 = min(j1 + sub, b)
                    for i in range(j1, j2):
                        if choose_groups and i % m == 0:
                            # N:M: the group's mask is chosen from its weights as updated so far
                            g = slice(i, i + m)
                            scores = (W1[g] * inv_d1[g]).square_()
                            order = torch.topk(scores, m - pattern.n, dim=0, largest=False).indices
                            scale[g].scatter_(0, order, 1.0).mul_(inv_d1[g])
                        if quantizer is None:
                            torch.mul(W1[i], scale[i], out=Err1[i])
                        else:
                            if group_of is not None:
                                quantizer.use_group(group_of[i1 + i])
                            elif (i1 + i) % quantizer.g == 0:
                                quantizer.start_group(WT, i1 + i, fixed)
                            quantizer.round_(W1[i], None if keep is None else keep[i], Q1[i])
                            torch.sub(W1[i], Q1[i], out=Err1[i]).mul_(inv_d1[i])
                        if i + 1 < j2:
                            W1[i + 1 : j2].addr_(U1[i, i + 1 : j2], Err1[i], alpha=-1)
                    if j2 < b:
                        W1[j2:].addmm_(U1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)
            if quantizer is None:
                W1.masked_fill_(scale != 0, 0)
            else:
                W1.copy_(Q1)
            if i2 < cols:
                WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
        if perm is not None:
            WT = torch.empty_like(WT).index_copy_(0, perm, WT)  # back to the inputs' own order
        if quantizer is None:
            return [WT[:, r1:r2].T.to(W.dtype).contiguous() for (r1, r2), W in zip(zip(bounds, bounds[1:]), weights)]
        return [quantizer.result(WT[:, r1:r2].T, r1, r2, W.dtype) for (r1, r2), W in zip(zip(bounds, bounds[1:]), weights)]


def _columns_compiled(kernel, quantizer: ColumnQuantizer, WT: Tensor, W1: Tensor, U1: Tensor, Q1: Tensor, Err1: Tensor,
                      inv_d1: Tensor, keep: Tensor | None, fixed: Tensor | None, group_of: list[int] | None, i1: int,
                      sub: int) -> None:
    """The quantizing column loop of one block (W1 = WT[i1 : i1 + b]) in the compiled kernel: per sub-block, its
    columns rounded with their rank-1 updates inside it, then one product for the rest of the block, as the torch
    loop does. Scales chosen as the loop reaches a group (no activation order) are chosen here, between calls."""
    b = W1.shape[0]
    scheme = quantizer.scheme
    U1c, inv_d = U1.contiguous(), inv_d1.reshape(-1).contiguous()
    no_keep = torch.empty(0)
    if group_of is not None:
        scale, zero = quantizer.grid(static=True)
        groups = torch.tensor(group_of[i1 : i1 + b], dtype=torch.int64)
    else:
        groups = torch.zeros(b, dtype=torch.int64)
    for j1 in range(0, b, sub):
        j2 = min(j1 + sub, b)
        a = j1
        while a < j2:
            stop = j2
            if group_of is None:
                if (i1 + a) % quantizer.g == 0:
                    quantizer.start_group(WT, i1 + a, fixed)
                stop = min(j2, (i1 + a) // quantizer.g * quantizer.g + quantizer.g - i1)
                scale, zero = quantizer.grid(static=False)
            kernel.gptq_columns(W1, U1c, Q1, Err1, inv_d, scale, zero, groups, no_keep if keep is None else keep, a,
                                stop, j2, float(scheme.qmin), float(scheme.qmax), bool(scheme.symmetric))
            a = stop
        if j2 < b:
            W1[j2:].addmm_(U1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)


def _stack(weights: list[Tensor]) -> tuple[Tensor, list[int]]:
    """The weights' transposes side by side ([in, Σ out], a column of every weight one contiguous row) and the
    row bounds of each."""
    WT = torch.cat([W.float().T for W in weights], dim=1) if len(weights) > 1 else weights[0].float().T.contiguous()
    bounds = [0]
    for W in weights:
        bounds.append(bounds[-1] + W.shape[0])
    return WT, bounds


def select_block(scores: Tensor, bounds: list[int], sparsities: list[float], i1: int, i2: int) -> Tensor:
    """The unstructured mask of columns i1:i2 (scores [i2 - i1, rows]): for each stacked weight (rows
    bounds[k]:bounds[k + 1]) its lowest scores over the whole block, as many as the running count asks."""
    mask = torch.empty_like(scores, dtype=torch.bool)
    b = scores.shape[0]
    for (r1, r2), sparsity in zip(zip(bounds, bounds[1:]), sparsities):
        # cumulative rounding keeps each matrix at exactly round(sparsity × numel) zeros
        k = round(sparsity * (r2 - r1) * i2) - round(sparsity * (r2 - r1) * i1)
        mask[:, r1:r2] = lowest_k(scores[:, r1:r2].reshape(1, -1), k).view(b, r2 - r1)
    return mask
