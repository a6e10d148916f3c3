"""DSnoT: training-free prune-and-grow on a pruned linear's mask (Zhang et al. 2024, arXiv:2310.08915).

Per output row, the pruned weights shift the row's expected output by ε = Σ_j (W_j − Ŵ_j)·E[x_j]
(summed over a calibration window). Each cycle regrows the pruned weight that best cancels ε (largest
sign(ε)·W_j·E[x_j] / Var(x_j)) and prunes a kept weight that pushes ε the other way (smallest Wanda
score |W_j|·‖x_j‖₂; for N:M, within the regrown weight's group), while |ε| exceeds a threshold and, with
the sign constraint, ε keeps its sign. Paper defaults: 50 cycles, threshold 0.1, variance power 1.

Unlike the paper's code, a refined row is kept only where it lowers the row's output error
‖(W − Ŵ)X‖² = (W − Ŵ) H (W − Ŵ)ᵀ (H = Σ x xᵀ) on each half of the calibration windows (even and odd),
so on the calibration data as a whole too; otherwise the solver's row stays. The refinement never makes
a linear worse than the solver it refines, and a swap that helps only one half (fitting the calibration
sample rather than the distribution; measured on SparseGPT at 70%) is not taken.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.solvers import Solver
from llmprune.masks import Pattern
from llmprune.solvers.sparsegpt import add_upper_, row_block, symmetric

CYCLES = 50  # paper default
THRESHOLD = 0.1  # paper default, in units of the row's output shift summed over one window
VAR_POWER = 1.0  # the growing criterion divides by Var(x_j) to this power (paper default)
RELATIVE_MARGIN = 1e-5  # a refined row must lower its output error by more than this share (fp32 noise is ~1e-6)


@dataclass(frozen=True)
class DSnoTConfig:
    cycles: int = CYCLES
    threshold: float = THRESHOLD
    same_sign: bool = True  # stop a row once a swap would flip the sign of its output shift
    var_power: float = VAR_POWER


class DSnoTStats:
    """Input statistics DSnoT needs: per-feature sums, squares and per-window variances, and the Hessian
    H = Σ x xᵀ of the even and of the odd calibration windows.

    The whole H can be borrowed from a solver that already accumulates it (SparseGPT): then only the
    even windows' half is gathered here, and the odd half is the difference.
    """

    def __init__(self, columns: int, device: torch.device, hessian_from=None, first_window: int = 0):
        self.first_window = first_window  # index of this process's first window among all (distributed ranks)
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)  # [in]
        self.sq_sum = torch.zeros(columns, dtype=torch.float64, device=device)  # [in]
        self.var_sum = torch.zeros(columns, dtype=torch.float64, device=device)  # Σ over windows of Var(x) in the window
        self.windows = 0
        self.tokens = 0
        self._hessian_from = hessian_from  # a solver whose .hessian is the upper block triangle of Σ x xᵀ
        self._H_even = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # upper block triangles
        self._H_odd = None if hessian_from is not None else torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._row_block = row_block(columns)

    def add_batch(self, x: Tensor, squares: Tensor | None = None) -> None:
        """x: [..., seqlen, in] (or [seqlen, in]); squares: x.float().square(), where the caller has it already."""
        x = x.float()
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)  # [windows, seqlen, in]
        squares = windows.square() if squares is None else squares.reshape(windows.shape)
        # per-window moments: one square and two sums (torch's var costs ~10x as much here); the variance
        # E[x²] − E[x]² is formed in fp64 from fp32 sums (relative error ~2e-7 against an fp64 var, measured)
        s1, s2 = windows.sum(1).double(), squares.sum(1).double()  # [windows, in]
        mean = s1 / windows.shape[1]
        self.var_sum += (s2 / windows.shape[1] - mean.square()).clamp_min(0).sum(0)
        self.sum += s1.sum(0)
        self.sq_sum += s2.sum(0)
        # window by window into its half: a window is a contiguous view, where gathering the even and the odd
        # windows first would copy them (10-30% slower on SmolLM2's inputs, measured)
        first = self.first_window + self.windows
        for k in range(windows.shape[0]):
            H = self._H_even if (first + k) % 2 == 0 else self._H_odd
            if H is not None:
                add_upper_(H, windows[k], self._row_block)
        self.windows += windows.shape[0]
        self.tokens += windows.shape[0] * windows.shape[1]

    def reduce_(self, sum_) -> None:
        """Sum the statistics over distributed ranks (after which the window parity needs no offset)."""
        for tensor in (self.sum, self.sq_sum, self.var_sum, self._H_even, self._H_odd):
            if tensor is not None:
                sum_(tensor)
        counts = sum_(torch.tensor([self.windows, self.tokens], device=self.sum.device))
        self.windows, self.tokens = int(counts[0]), int(counts[1])
        self.first_window = 0

    def hessians(self) -> list[Tensor]:
        """Σ x xᵀ over the even and over the odd calibration windows, full and symmetric: [in, in] each
        (one only, the whole, with a single window)."""
        even = symmetric(self._H_even)
        odd = symmetric(self._H_odd) if self._H_odd is not None else symmetric(self._hessian_from.hessian) - even
        return [even, odd] if self.windows > 1 else [even + odd]

    @property
    def H(self) -> Tensor:
        """Σ x xᵀ over every calibration token: [in, in]."""
        return sum(self.hessians())

    def window_mean(self) -> Tensor:
        """E[x_j] summed over a window: the reference code's per-window input sum."""
        return (self.sum / max(self.windows, 1)).float()

    def variance(self) -> Tensor:
        return (self.var_sum / max(self.windows, 1)).float()

    def norms(self) -> Tensor:
        return self.sq_sum.sqrt().float()


def output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> Tensor:
    """Per-row ‖(W − Ŵ) X‖² on the calibration tokens, from H = Σ x xᵀ: [out]."""
    delta = W.float() - W_hat.float()
    return ((delta @ H) * delta).sum(1)


def error_change(W: Tensor, W_old: Tensor, W_new: Tensor, H: Tensor) -> Tensor:
    """Per-row change of ‖(W − Ŵ) X‖² from Ŵ = W_old to W_new: (δ_new − δ_old) H (δ_new + δ_old)ᵀ.

    Computed as one product, without subtracting two large errors, so it keeps its own precision.
    """
    W = W.float()
    delta_old, delta_new = W - W_old.float(), W - W_new.float()
    return ((delta_new - delta_old) * ((delta_new + delta_old) @ H)).sum(1)


def dsnot_mask(W: Tensor, mask: Tensor, stats: DSnoTStats, pattern: Pattern, config: DSnoTConfig = DSnoTConfig(),
               kept_values: Tensor | None = None) -> Tensor:
    """DSnoT's refined mask (True = pruned) from a solver's mask; same count per row, same N:M groups.

    W: the dense weight [out, in]; kept_values: the solver's values where it kept a weight (SparseGPT
    updates them; default W). A regrown weight takes its dense value.
    """
    W = W.float()
    current = W if kept_values is None else torch.where(mask, W, kept_values.float())  # each weight's value if kept
    mean = stats.window_mean()
    contribution = current * mean  # [out, in]: the row's output shift if this weight is pruned
    error = ((W - torch.where(mask, torch.zeros_like(current), current)) * mean).sum(1)  # [out]
    grow_score = contribution / stats.variance().clamp_min(1e-12).pow(config.var_power)
    wanda = current.abs() * stats.norms()
    pruned = mask.clone()
    rows = torch.arange(W.shape[0], device=W.device)
    inf = torch.tensor(float("inf"), device=W.device)

    depth = min(config.cycles, W.shape[1])  # a row takes at most one candidate per cycle from each list

    def order(keys: Tensor) -> tuple[Tensor, Tensor]:
        """The `depth` lowest keys of each row, ascending, and their columns (inf = no candidate)."""
        sorted_keys, index = torch.topk(keys, depth, dim=1, largest=False, sorted=True)
        return index, sorted_keys

    # candidates to regrow: pruned weights whose contribution has the sign of ε, best first
    grow_pos = order(torch.where(mask & (contribution > 0), -grow_score, inf))
    grow_neg = order(torch.where(mask & (contribution < 0), grow_score, inf))
    if not pattern.structured:
        # candidates to prune: kept weights whose contribution has the sign opposite to ε, lowest Wanda score first
        prune_pos = order(torch.where(~mask & (contribution > 0), wanda, inf))
        prune_neg = order(torch.where(~mask & (contribution < 0), wanda, inf))
    else:
        prunable = torch.where(~mask, wanda, inf)  # kept at the start and not yet swapped out
        offsets = torch.arange(pattern.m, device=W.device)
    pointers = torch.zeros(4, W.shape[0], dtype=torch.long, device=W.device)
    active = error.abs() > config.threshold
    initial_sign = torch.sign(error)
    last = depth - 1
    for _ in range(config.cycles):
        if not bool(active.any()):
            break
        positive = error > 0
        j_pos, key_jp = (t.gather(1, pointers[0].clamp_max(last)[:, None])[:, 0] for t in grow_pos)
        j_neg, key_jn = (t.gather(1, pointers[1].clamp_max(last)[:, None])[:, 0] for t in grow_neg)
        grow = torch.where(positive, j_pos, j_neg)
        valid = torch.isfinite(torch.where(positive, key_jp, key_jn)) & (pointers.amax(0) <= last)
        if not pattern.structured:
            k_neg, key_kn = (t.gather(1, pointers[3].clamp_max(last)[:, None])[:, 0] for t in prune_neg)
            k_pos, key_kp = (t.gather(1, pointers[2].clamp_max(last)[:, None])[:, 0] for t in prune_pos)
            cut = torch.where(positive, k_neg, k_pos)
            valid &= torch.isfinite(torch.where(positive, key_kn, key_kp))
        else:
            group = (grow - grow % pattern.m)[:, None] + offsets  # [out, m]
            candidates = prunable.gather(1, group)
            best, arg = candidates.min(dim=1)
            cut = group.gather(1, arg[:, None])[:, 0]
            valid &= torch.isfinite(best)
        after = error - contribution[rows, grow] + contribution[rows, cut]
        update = active & valid & (error.abs() > config.threshold)
        if config.same_sign:
            update &= torch.sign(after) == initial_sign
        if not bool(update.any()):
            break
        r = rows[update]
        pruned[r, grow[update]] = False
        pruned[r, cut[update]] = True
        if pattern.structured:
            prunable[r, cut[update]] = inf
        error = torch.where(update, after, error)
        pointers[0] += (update & positive).long()
        pointers[1] += (update & ~positive).long()
        if not pattern.structured:
            pointers[2] += (update & ~positive).long()
            pointers[3] += (update & positive).long()
        active = update
    return pruned


class RefinedSolver(Solver):
    """A solver followed by DSnoT on each weight it prunes; keeps a refined row only where it lowers the output error."""

    def __init__(self, base: Solver, columns: int, device: torch.device, config: DSnoTConfig = DSnoTConfig(), first_window: int = 0):
        self.base = base
        self.config = config
        self.stats = DSnoTStats(columns, device, hessian_from=base if base.hessian is not None else None,
                                first_window=first_window)
        self.reports: list[dict] = []  # one per pruned weight, in the order pruned

    @property
    def solves_together(self) -> bool:
        return self.base.solves_together

    @property
    def selects_across_rows(self) -> bool:
        return self.base.selects_across_rows

    def add_batch(self, x: Tensor) -> None:
        squares = None
        if self.base.takes_squares:  # both need Σx²: square the batch once
            squares = x.float().square()
            self.base.add_batch(x, squares=squares)
        elif self.base.needs_data:
            self.base.add_batch(x)
        self.stats.add_batch(x, squares)

    def row_separable(self, pattern: Pattern) -> bool:
        return self.base.row_separable(pattern)  # DSnoT itself works row by row

    def reduce_(self, sum_) -> None:
        self.base.reduce_(sum_)
        self.stats.reduce_(sum_)

    def prune(self, W: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
        return self._refine([W], [self.base.prune(W, sparsity, pattern)], pattern)[0]

    def prune_many(self, weights: list[Tensor], sparsities: list[float], pattern: Pattern, select=None) -> list[Tensor]:
        return self._refine(weights, self.base.prune_many(weights, sparsities, pattern, select=select), pattern)

    def gptq(self):
        return self.base.gptq()

    def take_reports(self, count: int) -> list[dict | None]:
        taken, self.reports = self.reports[:count], self.reports[count:]
        return taken + [None] * (count - len(taken))

    def _refine(self, weights: list[Tensor], pruned: list[Tensor], pattern: Pattern) -> list[Tensor]:
        halves = self.stats.hessians()
        out = []
        for W, W_s in zip(weights, pruned):
            mask = W_s == 0
            new_mask = dsnot_mask(W, mask, self.stats, pattern, self.config, kept_values=W_s)
            W_r = torch.where(new_mask, torch.zeros_like(W_s), torch.where(mask, W, W_s))
            moved = (new_mask != mask).any(1).nonzero().squeeze(1)  # rows DSnoT changed: only these can improve
            before, change, clear = 0, 0, torch.ones(moved.numel(), dtype=torch.bool, device=W.device)
            for H in halves:
                half_before = output_error(W, W_s, H)
                half_change = error_change(W[moved], W_s[moved], W_r[moved], H)
                clear &= half_change < -RELATIVE_MARGIN * half_before[moved]  # a clear drop on this half, not float noise
                before, change = before + half_before, change + half_change
            better = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
            better[moved[clear]] = True
            final = torch.where(better[:, None], W_r, W_s)
            self.reports.append({
                "rows_refined": int(better.sum()), "rows": W.shape[0],
                "swaps": int((new_mask & ~mask)[better].sum()),
                "error_before": float(before.double().sum()),
                "error_after": float(before.double().sum() + change[clear].double().sum()),
            })
            out.append(final)
        return out
