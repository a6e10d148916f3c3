"""Per-block sparsity: uniform, or OWL's outlier-weighted allocation (Yin et al. 2024, arXiv:2310.05175)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

OWL_M = 5.0  # paper default: an outlier scores above M × the mean
OWL_LAMBDA = 0.08  # paper default: block sparsities within ±λ of the target


def outlier_ratio(scores: Sequence[Tensor], m: float = OWL_M) -> float:
    """Share of a block's Wanda scores |W|·‖X‖₂ (all its linears together) above m × their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl(ratios: Sequence[float], target: float, *, lam: float = OWL_LAMBDA,
        weights: Sequence[float] | None = None) -> list[float]:
    """Block sparsities from outlier ratios: more outliers, lower sparsity; the weighted mean is exactly `target`.

    OWL maps the ratios linearly onto a spread of 2λ around the target (the paper's code); where the ratios are
    skewed, the map is shrunk so that no block leaves [target − λ, target + λ]. weights: each block's number of
    prunable weights (default equal), so the model-wide sparsity is the target.
    """
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        return []
    w = torch.ones_like(r) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    if bool((w <= 0).any()):
        raise ValueError("block weights must be positive")
    w = w / w.sum()
    deviation = r - (w * r).sum()
    spread = float(r.max() - r.min())
    if spread < 1e-12 or lam == 0:  # equal ratios (a spread of denormals would make the scale overflow to inf)
        return [float(target)] * r.numel()
    scale = min(2 * lam / spread, lam / float(deviation.abs().max()))
    sparsities = target - deviation * scale
    low, high = float(sparsities.min()), float(sparsities.max())
    if low < 0 or high >= 1:
        raise LlmpruneError(f"OWL with λ={lam:g} around sparsity {target:g} gives block sparsities from {low:.3f} to "
                            f"{high:.3f}, outside [0, 1); lower --owl-lambda below {min(target, 1 - target):g}.")
    return [float(s) for s in sparsities]


def owl_blocks(ratios: Sequence[float], sizes: Sequence[int], target: float, *, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's sparsity for every decoder block from its outlier ratio and number of prunable weights; a block with
    nothing to prune gets 0 and no share of the target."""
    live = [i for i, size in enumerate(sizes) if size]
    chosen = owl([ratios[i] for i in live], target, lam=lam, weights=[sizes[i] for i in live])
    sparsities = [0.0] * len(sizes)
    for i, value in zip(live, chosen):
        sparsities[i] = value
    return sparsities
