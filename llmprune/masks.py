"""Sparsity patterns (unstructured, N:M) and mask selection from a score matrix."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or N:M: at most n non-zeros in every m consecutive inputs."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def implied_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.structured else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


UNSTRUCTURED = Pattern()


def parse_pattern(text: str) -> Pattern:
    """'unstructured' or 'N:M' with 0 < N < M (NVIDIA's convention, e.g. 2:4)."""
    text = str(text).strip().lower()
    if text in ("unstructured", "none", ""):
        return UNSTRUCTURED
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise LlmpruneError(
            f"pattern '{text}' is not understood; use 'unstructured' or N:M with integers, e.g. 2:4 or 4:8."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise LlmpruneError(
            f"pattern {n}:{m} is impossible: N:M keeps N of every M weights and needs 0 < N < M; try 2:4 or 4:8."
        )
    return Pattern(n, m)


def check_pattern_fits(pattern: Pattern, inputs: dict[str, int]) -> None:
    """Every target linear's input width (name -> columns) a multiple of an N:M pattern's M, or an error naming the
    first that is not; checked before calibration, so that no solver meets a partial group."""
    if not pattern.structured:
        return
    bad = [(name, cols) for name, cols in inputs.items() if cols % pattern.m]
    if bad:
        name, cols = bad[0]
        more = f" (and {len(bad) - 1} more linears)" if len(bad) > 1 else ""
        raise LlmpruneError(f"pattern {pattern} groups every {pattern.m} inputs, but {name} has {cols}, not a multiple "
                            f"of {pattern.m}{more}; pick an M that divides it (2:4 or 4:8 fit most models) or leave "
                            "the linear out with --ignore.")


def check_sparsity(sparsity: float, pattern: Pattern) -> float:
    """Validate a sparsity against a pattern; N:M fixes it at 1 - N/M."""
    if pattern.structured:
        implied = pattern.implied_sparsity
        if sparsity is None:
            return implied
        if abs(sparsity - implied) > 1e-9:
            raise LlmpruneError(
                f"sparsity {sparsity:g} does not match pattern {pattern}, which implies {implied:g} "
                f"(1 - {pattern.n}/{pattern.m}); pass --sparsity {implied:g} or leave it out."
            )
        return implied
    if sparsity is None:
        return 0.5
    if not (0.0 <= sparsity < 1.0):
        raise LlmpruneError(f"sparsity {sparsity:g} is outside [0, 1); pass a fraction such as 0.5.")
    return float(sparsity)


def prune_count(size: int, sparsity: float) -> int:
    """How many of `size` weights a comparison group prunes (floor, as the reference code does)."""
    return int(size * sparsity)


def select_mask(scores: Tensor, sparsity: float, pattern: Pattern, *, per_row: bool = True) -> Tensor:
    """Bool mask (True = prune) of the lowest scores.

    scores: [rows, cols]. N:M compares within each group of M consecutive columns of a row;
    unstructured compares within each row (per_row) or across the whole matrix. Ties are broken by
    position (stable sort), so the mask is deterministic.
    """
    rows, cols = scores.shape
    if pattern.structured:
        check_pattern_fits(pattern, {"a linear": cols})
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : pattern.m - pattern.n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(rows, cols)
    if per_row:
        return lowest_k(scores, prune_count(cols, sparsity))
    return lowest_k(scores.reshape(1, -1), prune_count(rows * cols, sparsity)).reshape(rows, cols)


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Mask of the k lowest scores of each row, ties taken in column order (as a stable sort would).

    A k-th-value selection plus a tie fill is linear time; a full sort of a 1536 × 576 matrix costs 7× more.
    On the CPU it runs in numpy, whose introselect and comparisons were measured 8-13× faster than torch's
    kthvalue and several times faster than its comparisons on these sizes (a single row of a whole matrix's
    budget takes kth_smallest's bracketed selection); elsewhere in torch. Same mask.
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(_lowest_k_numpy(scores.detach().numpy(), k))
    return _lowest_k_torch(scores, k)


SAMPLED_FROM = 1 << 16  # scores from this many on: the k-th value is bracketed from a strided sample first
SAMPLE = 1 << 15  # about this many scores in the sample
SAMPLE_MARGIN = 6.0  # the bracket's half-width, in standard deviations of the sample rank of the k-th value


def kth_smallest(scores, k: int, scratch=None, flags=None) -> float:
    """The k-th smallest (1-based) of the numpy vector `scores`, exactly; `scratch` (of its dtype) and `flags`
    (bool), buffers of its size, may be passed to be reused. Large vectors are bracketed first: a strided sample's
    quantiles around rank k give lo ≤ hi, one pass counts the scores below lo and gathers those in [lo, hi] (a few
    percent), and only those are partitioned; where the bracket misses the k-th (a sample unlike the whole), the
    whole vector is. numpy's AVX-512 partition stores with vcompressps, which AMD Zen 4 runs slowly: 8.7 ms for
    2048 × 640 scores there, against 1.4 ms bracketed."""
    import numpy as np

    n = scores.size
    if n >= SAMPLED_FROM:
        flags = np.empty(n, bool) if flags is None else flags
        step = n // SAMPLE
        sample = scores[::step].copy()
        s = sample.size
        at = (k - 1) * (s - 1) / max(n - 1, 1)  # the k-th's expected rank in the sample
        p = k / n
        margin = SAMPLE_MARGIN * (s * p * (1 - p)) ** 0.5 + 2
        lo_i, hi_i = max(0, int(at - margin)), min(s - 1, int(at + margin) + 1)
        sample.partition((lo_i, hi_i))
        lo, hi = sample[lo_i], sample[hi_i]
        np.greater_equal(scores, lo, out=flags)
        below = n - np.count_nonzero(flags)
        rank = k - 1 - below
        if rank >= 0:
            np.logical_and(flags, scores <= hi, out=flags)
            candidates = np.compress(flags, scores)
            if rank < candidates.size:
                candidates.partition(rank)
                return float(candidates[rank])
    if scratch is None:
        return float(np.partition(scores, k - 1)[k - 1])
    np.copyto(scratch, scores)
    scratch.partition(k - 1)
    return float(scratch[k - 1])


def _lowest_k_numpy(a, k: int):
    import numpy as np

    if a.shape[0] == 1 and a.shape[1] >= SAMPLED_FROM:  # one large row (a whole matrix's budget): bracketed
        threshold = np.full((1, 1), kth_smallest(a[0], k), a.dtype)
    else:
        threshold = np.partition(a, k - 1, axis=1)[:, k - 1 : k]  # [rows, 1]
    below = a < threshold
    ties = a == threshold
    room = k - np.count_nonzero(below, axis=1)[:, None]  # how many tied scores each row still prunes
    if (np.count_nonzero(ties, axis=1)[:, None] == room).all():  # the usual case: no tie straddles the cut
        return below | ties
    # the first `room` ties of each row, in column order: ranks over the tied positions only (a cumulative sum
    # over every column costs 5× more where weights repeat, as in a dequantized GGUF model)
    rows, cols = np.nonzero(ties)
    starts = np.searchsorted(rows, np.arange(a.shape[0]))
    first = np.arange(rows.size) - starts[rows] < room[rows, 0]
    below[rows[first], cols[first]] = True
    return below


def _lowest_k_torch(scores: Tensor, k: int) -> Tensor:
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values  # [rows, 1]
    below = scores < threshold
    ties = scores == threshold
    room = k - torch.count_nonzero(below, dim=1).unsqueeze(1)
    if bool((torch.count_nonzero(ties, dim=1).unsqueeze(1) == room).all()):
        return below | ties
    return below | (ties & (ties.cumsum(dim=1) <= room))


def pattern_holds(weight: Tensor, pattern: Pattern) -> bool:
    """True if every group of M consecutive inputs of every row has at most N non-zeros."""
    if not pattern.structured:
        return True
    rows, cols = weight.shape
    if cols % pattern.m:
        return False
    nonzero = (weight != 0).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
    return bool((nonzero <= pattern.n).all())
