"""Integer weight quantization (W4A16, W8A16): the scheme, its grid, and GPTQ that keeps a sparsity mask.

A scheme is `bits` (4 or 8), `group_size` (inputs sharing one scale per output row; 0 = one scale per row, the
"channel" strategy) and `symmetric`. The grid follows compressed-tensors' quantization arithmetic (its
`calculate_qparams` and `fake_quantize`), so that a checkpoint written in its `pack-quantized` format dequantizes
to exactly the weights computed here:

    q = clamp(round(w / scale) + zero_point, qmin, qmax),  ŵ = (q − zero_point) · scale,  qmin = −2^(b−1), qmax = 2^(b−1) − 1
    symmetric:  scale = max|w| / (2^b / 2),            zero_point = 0
    asymmetric: scale = (max w − min w) / (2^b − 1),    zero_point = clamp(qmin − round(min w / scale), qmin, qmax)

with min and max taken over the group and always spanning 0, so a pruned weight (0) is exactly representable:
q = zero_point gives ŵ = 0 whatever the scale, and the sparsity survives quantization bit for bit.

GPTQ (Frantar et al. 2023, arXiv:2210.17323) rounds the columns of W left to right and spreads each column's
rounding error over the columns not yet rounded through the upper Cholesky factor of H⁻¹, as SparseGPT spreads
its pruning error: it runs in SparseGPT's column loop (SparseGPTSolver.quantize_many), from the Hessian the
solvers gather anyway. It keeps a mask: a pruned position is set to 0 instead of being rounded and its error is
spread the same way, so the zeros stay zeros and an N:M pattern holds.

Pruning first and quantizing the pruned weight (the mask fixed) is preferred here to the SparseGPT paper's joint
pass (its Section 4: mask and rounding in one sweep). Measured on 40 × 64 layers with correlated inputs
(tests/test_quant.py's), the joint pass rounds with scales chosen before the pruning updates have grown the kept
weights (2:4 took the largest |w| from 3.85 to 8.81), so many codes clip: its layer error at W8 per channel was
1.37× that of pruning alone at 2:4 against 1.01× sequentially, and at W4 g16 2:4 1.92e7 against 1.79e7; only at
W4 per channel unstructured was it lower (4.69e6 against 5.05e6). Sequential also works after every solver.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

SCHEMES = ("w4a16", "w8a16")
DEFAULT_GROUP_SIZE = 128


@dataclass
class Quantized:
    """A quantized weight: ŵ (the dequantized values, in the model's dtype), codes (int8, [out, in]), and per group
    scale and zero_point ([out, groups], fp32; zero_point holds integers)."""

    weight: Tensor
    codes: Tensor
    scale: Tensor
    zero: Tensor


@dataclass(frozen=True)
class QuantScheme:
    """bits: 4 or 8; group_size: inputs per scale (0: one scale per output row); symmetric: zero point 0."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise LlmpruneError(f"quantization to {self.bits} bits is not supported; use w4a16 or w8a16.")
        if self.group_size < 0:
            raise LlmpruneError(f"group size must be positive, or 0 for one scale per output row; got {self.group_size}.")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def name(self) -> str:
        return f"w{self.bits}a16"

    def groups(self, columns: int) -> int:
        """Scales per output row of a weight with `columns` inputs."""
        return 1 if self.group_size == 0 else -(-columns // self.group_size)

    def check(self, name: str, columns: int) -> None:
        if self.group_size and columns % self.group_size:
            raise LlmpruneError(f"{name} has {columns} inputs, not a multiple of the group size {self.group_size}; "
                                f"pass a --group-size that divides it (e.g. {_divisor(columns, self.group_size)}) or 0 "
                                "for one scale per output row.")


def _divisor(columns: int, near: int) -> int:
    return max((g for g in range(1, columns + 1) if columns % g == 0 and g <= near), default=1)


def parse_scheme(text: str, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> QuantScheme | None:
    """'w4a16' / 'w8a16' -> a scheme; 'none' -> None."""
    if text in ("none", ""):
        return None
    match = re.fullmatch(r"w(\d+)a16", text.lower())
    if not match:
        raise LlmpruneError(f"quantize: unknown scheme '{text}'; choose w4a16, w8a16 or none.")
    return QuantScheme(int(match.group(1)), group_size, symmetric)


def qparams(lo: Tensor, hi: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) from the minimum and maximum of each group (any shape; zero_point as float)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    levels = float(1 << scheme.bits)
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (levels / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (levels - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: any scale, 1 as theirs
    if not scheme.symmetric:
        zero = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def weight_qparams(W: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Round-to-nearest parameters of W [out, in]: scale and zero_point [out, groups]."""
    out, cols = W.shape
    g = scheme.group_size or cols
    grouped = W.float().reshape(out, cols // g, g)
    return qparams(grouped.amin(-1), grouped.amax(-1), scheme)


def quantize(W: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """Integer codes of W [out, in] (int8 storage: every code fits), scale/zero [out, groups]."""
    g = W.shape[1] // scale.shape[1]
    s, z = scale.repeat_interleave(g, 1), zero.repeat_interleave(g, 1)
    return (torch.round(W.float() / s) + z).clamp_(scheme.qmin, scheme.qmax).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    g = q.shape[1] // scale.shape[1]
    return ((q.float() - zero.repeat_interleave(g, 1)) * scale.float().repeat_interleave(g, 1)).to(dtype)


def round_to_nearest(W: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor, Tensor]:
    """(ŵ, scale, zero_point) without error feedback: the baseline GPTQ improves on."""
    scale, zero = weight_qparams(W, scheme)
    return dequantize(quantize(W, scale, zero, scheme), scale, zero, W.dtype), scale, zero


class ColumnQuantizer:
    """Rounds the columns of a weight kept transposed (WT: [in, out], a column of W is a contiguous row), one at a
    time, GPTQ's way: a group's scales are chosen when its first column is reached, from the columns as updated by
    the error of those before (GPTQ's `static_groups=False`, its default). Pruned positions, given as a float mask
    (1 kept), round to 0."""

    def __init__(self, scheme: QuantScheme, columns: int, rows: int, device):
        self.scheme = scheme
        self.g = scheme.group_size or columns
        groups = -(-columns // self.g)
        self.scale = torch.empty(rows, groups, device=device)
        self.zero = torch.empty(rows, groups, device=device)
        self._s = self._z = None

    def start_group(self, WT: Tensor, i: int) -> None:
        """Choose the scales of the group whose first column is i from WT's rows i : i + group."""
        block = WT[i : i + self.g]
        s, z = qparams(block.amin(0), block.amax(0), self.scheme)
        k = i // self.g
        self.scale[:, k], self.zero[:, k] = s, z
        self._s, self._z = s, z

    def result(self, W: Tensor, r1: int, r2: int, dtype: torch.dtype) -> Quantized:
        """The Quantized of the rows r1:r2 of the rounded weight W ([rows, in], fp32, on the grid)."""
        scale, zero = self.scale[r1:r2].contiguous(), self.zero[r1:r2].contiguous()
        return Quantized(W.to(dtype).contiguous(), quantize(W, scale, zero, self.scheme), scale, zero)

    def round_(self, row: Tensor, keep: Tensor | None, out: Tensor) -> None:
        """out ← ŵ of one column (row of WT), 0 where keep is 0."""
        torch.div(row, self._s, out=out)
        out.round_().add_(self._z).clamp_(self.scheme.qmin, self.scheme.qmax).sub_(self._z).mul_(self._s)
        if keep is not None:
            out.mul_(keep)
