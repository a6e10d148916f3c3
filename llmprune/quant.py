"""Integer weight quantization (W4A16, W8A16): the scheme, its grid, and GPTQ that keeps a sparsity mask.

A scheme is `bits` (4 or 8), `group_size` (inputs sharing one scale per output row; 0 = one scale per row, the
"channel" strategy) and `symmetric`. The grid follows compressed-tensors' quantization arithmetic (its
`calculate_qparams` and `fake_quantize`), so that a checkpoint written in its `pack-quantized` format dequantizes
to exactly the weights computed here:

    q = clamp(round(w / scale) + zero_point, qmin, qmax),  ŵ = (q − zero_point) · scale,  qmin = −2^(b−1), qmax = 2^(b−1) − 1
    symmetric:  scale = max|w| / ((qmax − qmin) / 2),   zero_point = 0          (4 bits: max|w| / 7.5)
    asymmetric: scale = (max w − min w) / (qmax − qmin), zero_point = round(clamp(qmin − min w / scale, qmin, qmax))

with min and max taken over the group and always spanning 0, so a pruned weight (0) is exactly representable:
q = zero_point gives ŵ = 0 whatever the scale, and the sparsity survives quantization bit for bit. The scale is
rounded to the model's dtype before use, since that is what the checkpoint stores: ŵ = (q − zero_point)·scale is
then exact in fp32 (a code times a bf16/fp16 scale) and rounds to the model's dtype as compressed-tensors'
dequantization (computed in that dtype) rounds it, so the model in memory and the model loaded agree bit for bit.

GPTQ (Frantar et al. 2023, arXiv:2210.17323) rounds the columns of W left to right and spreads each column's
rounding error over the columns not yet rounded through the upper Cholesky factor of H⁻¹, as SparseGPT spreads
its pruning error: it runs in SparseGPT's column loop (SparseGPTSolver.quantize_many), from the Hessian the
solvers gather anyway. It keeps a mask: a pruned position is set to 0 instead of being rounded and its error is
spread the same way, so the zeros stay zeros and an N:M pattern holds.

After a solve, GPTQ rounds the weight as it was before pruning, with the solver's mask fixed: its error feedback
then makes up for the pruned weights as well as for the rounding, from the same sweep, and the group ranges are
taken over the kept weights only (a pruned one rounds to 0, inside every range). The SparseGPT paper's joint pass
(its Section 4), which also chooses the mask in that sweep, was measured worse: on 40 × 64 layers with
correlated inputs (tests/test_quant.py's) its ranges were chosen before the pruning updates had grown the kept
weights (2:4 took the largest |w| from 3.85 to 8.81), so many codes clipped: layer error at W8 per channel 1.37×
that of pruning alone at 2:4. Then coordinate descent on the codes (`descend_codes`, QuantEase's) lowers each
layer's error towards the weight before pruning, refitting the kept weights on the support as it rounds them.
On SmolLM2 2:4 W4 g64 (README "Sparse and quantized"; one run each): GPTQ on the pruned weight 70.76; on the
weight before pruning 69.26 (ranges still over every weight); that and three passes of descent 61.43, or 60.43
with the ranges over the kept weights; 2:4 unquantized 58.62. Descent from GPTQ on the pruned weight: 64.83.
Over calibration seeds 0-4, six passes (the default after pruning, recipe.AUTO_PASSES) gave a mean of 62.07
against 63.54 at three, lower on every seed; 2:4 unquantized 60.17.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

SCHEMES = ("w4a16", "w8a16")
DEFAULT_GROUP_SIZE = 128
OBSERVERS = ("minmax", "mse")
SHRINKS = torch.linspace(1.0, 0.81, 20).tolist()  # the mse observer's range factors (llm-compressor's MSE observer's grid)


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
    """bits: 4 or 8; group_size: inputs per scale (0: one scale per output row); symmetric: zero point 0;
    actorder: GPTQ rounds the columns by descending diag(H), with static groups (the layout is the same);
    observer: how a group's range is chosen: minmax (its minimum and maximum) or mse (shrunk towards 0 where that
    lowers the group's rounding error weighted by diag(H): `clipped_qparams`); passes: coordinate-descent passes
    over GPTQ's codes towards the weight before pruning (`descend_codes`; 0: GPTQ's codes as they are)."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = True
    actorder: bool = False
    observer: str = "minmax"
    passes: int = 0

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise LlmpruneError(f"quantization to {self.bits} bits is not supported; use w4a16 or w8a16.")
        if self.group_size < 0:
            raise LlmpruneError(f"group size must be positive, or 0 for one scale per output row; got {self.group_size}.")
        if self.observer not in OBSERVERS:
            raise LlmpruneError(f"observer: unknown value '{self.observer}'; choose one of {', '.join(OBSERVERS)}.")
        if self.passes < 0:
            raise LlmpruneError(f"quant passes must be 0 or more; got {self.passes} (0 keeps GPTQ's codes).")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def name(self) -> str:
        return f"w{self.bits}a16"

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per channel"
        return (f"{self.name} {group} {'symmetric' if self.symmetric else 'asymmetric'}" + (" actorder" if self.actorder else "")
                + (f" {self.observer}" if self.observer != "minmax" else "") + (f" descent {self.passes}" if self.passes else ""))

    def groups(self, columns: int) -> int:
        """Scales per output row of a weight with `columns` inputs."""
        return 1 if self.group_size == 0 else -(-columns // self.group_size)

    def check(self, name: str, columns: int) -> None:
        self.check_all({name: columns})

    def check_linears(self, linears: dict) -> None:
        """Every target linear (name -> module, as models.find_linears gives them) one this scheme can store."""
        from llmprune.models import ExpertProjection, in_features

        for name, module in linears.items():
            if isinstance(module, ExpertProjection):
                if not self.symmetric:
                    raise LlmpruneError(f"{name}: asymmetric quantization of MoE experts would not load (transformers "
                                        "expands stored experts without their zero points); drop --asymmetric, or leave "
                                        "the experts out with --ignore.")
                continue
            if not isinstance(module, torch.nn.Linear):
                raise LlmpruneError(f"{name} is a {type(module).__name__}, not an nn.Linear, which the pack-quantized "
                                    "format stores; leave it out with --ignore, or prune without --quantize.")
        self.check_all({name: in_features(module) for name, module in linears.items()})

    def check_all(self, inputs: dict[str, int]) -> None:
        """Every linear's input width (name -> columns) a multiple of the group size, or an error naming the first
        that is not and a group size that divides them all."""
        bad = [(n, c) for n, c in inputs.items() if self.group_size and c % self.group_size]
        if bad:
            name, columns = bad[0]
            common = math.gcd(*inputs.values())
            fit = max((g for g in range(1, self.group_size + 1) if common % g == 0), default=1)
            raise LlmpruneError(f"{name} has {columns} inputs, not a multiple of the group size {self.group_size}"
                                f"{f' (nor are {len(bad) - 1} more linears)' if len(bad) > 1 else ''}; pass --group-size "
                                f"{fit}, which divides every linear's inputs, or 0 for one scale per "
                                "output row.")


def parse_scheme(text: str, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True,
                 actorder: bool = False, observer: str = "minmax", passes: int = 0) -> QuantScheme | None:
    """'w4a16' / 'w8a16' -> a scheme; 'none' -> None."""
    if text in ("none", ""):
        return None
    match = re.fullmatch(r"w(\d+)a16", text.lower())
    if not match:
        raise LlmpruneError(f"quantize: unknown scheme '{text}'; choose w4a16, w8a16 or none.")
    return QuantScheme(int(match.group(1)), group_size, symmetric, actorder, observer, passes)


def qparams(lo: Tensor, hi: Tensor, scheme: QuantScheme, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) from the minimum and maximum of each group (any shape), as compressed-tensors'
    calculate_qparams computes them; the scale is rounded to `dtype` (the model's: what the checkpoint stores) and
    returned as fp32, the zero point as fp32 holding integers."""
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((scheme.qmax - scheme.qmin) / 2)
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale).to(dtype).float()
    if scheme.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = torch.round((scheme.qmin - lo / scale).clamp(scheme.qmin, scheme.qmax))
    return scale, zero


def round_to_grid(x: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme, *, out: Tensor) -> Tensor:
    """out ← x rounded to the grid of scale and zero (broadcast against x), dequantized: (clamp(round(x / s) + z) −
    z) · s, in place in `out` (the hot loops call it per column and per range factor). A symmetric scheme's zero
    point is 0 and skipped."""
    torch.div(x, scale, out=out).round_()
    if scheme.symmetric:
        return out.clamp_(scheme.qmin, scheme.qmax).mul_(scale)
    return out.add_(zero).clamp_(scheme.qmin, scheme.qmax).sub_(zero).mul_(scale)


def clipped_qparams(block: Tensor, importance: Tensor, scheme: QuantScheme,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of groups block [..., g, rows] (a group's inputs along dim −2, one group per row): the
    range [min, max] shrunk by the factor in SHRINKS that gives each row the least Σ_j importance_j · (w_j − ŵ_j)²
    (importance [..., g]: diag(H), the inputs' energy), so that a few large weights stop coarsening the grid of the
    rest. The factors are llm-compressor's MSE observer's; weighting by diag(H) (its observer weighs every input
    alike) aims at the layer's output error, GPTQ's objective. A pruned 0 is still exact: any range spans 0."""
    lo, hi = block.amin(-2), block.amax(-2)
    # Σ_j importance_j · d_j² as one batched product per factor ([..., 1, g] @ [..., g, rows]) into a buffer reused
    # across factors: the search was 20 passes of ten elementwise operators, each allocating, half of GPTQ's time
    weight = importance.float().reshape(-1, 1, block.shape[-2])
    flat = block.reshape(-1, *block.shape[-2:])
    buf = torch.empty_like(flat)
    best = best_err = None
    for shrink in SHRINKS:
        s, z = qparams(lo * shrink, hi * shrink, scheme, dtype)
        sb = s.reshape(-1, 1, flat.shape[-1])
        round_to_grid(flat, sb, z.reshape(-1, 1, flat.shape[-1]), scheme, out=buf).sub_(flat).square_()
        err = torch.bmm(weight, buf).reshape(s.shape)
        if best is None:
            best, best_err = [s, z], err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = [torch.where(better, s, best[0]), torch.where(better, z, best[1])]
    return best[0], best[1]


def weight_qparams(W: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Round-to-nearest parameters of W [out, in]: scale and zero_point [out, groups]."""
    out, cols = W.shape
    g = scheme.group_size or cols
    grouped = W.float().reshape(out, cols // g, g)
    return qparams(grouped.amin(-1), grouped.amax(-1), scheme, W.dtype)


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


def rounded_to_nearest(W: Tensor, scheme: QuantScheme) -> Quantized:
    """W rounded to nearest on the scheme's grid (each group's min/max range) as a Quantized: for a weight without the
    statistics GPTQ needs (an expert that saw fewer calibration tokens than its inputs). Zeros stay zeros."""
    W_hat, scale, zero = round_to_nearest(W, scheme)
    return Quantized(W_hat, quantize(W_hat, scale, zero, scheme), scale, zero)


def descend_codes(quantized: Quantized, target: Tensor, pruned: Tensor, H: Tensor, scheme: QuantScheme, passes: int,
                  block: int = 32) -> Quantized:
    """Lower the layer error tr((T − Ŵ) H (T − Ŵ)ᵀ) of a quantized weight by cyclic coordinate descent on its codes
    (QuantEase: Behdin et al. 2023, arXiv:2309.01885). With every other input column fixed, the error is a
    quadratic in column j whose minimum over the grid is, row by row, the grid point nearest its unconstrained
    minimum ŵ_j + ((T − Ŵ) H)_j / H_jj; taking it for j = 1 … in is one pass, and no step can raise the error.
    target: T, the weight the layer should reproduce ([out, in]; the weight before pruning, so the kept weights
    are refitted on the support as well as rounded); pruned: bool [out, in], positions that stay 0 (an N:M
    pattern therefore holds); H = X Xᵀ up to scale, dampened as GPTQ's is (a positive diagonal). Scales and zero
    points stay. At most `passes` passes, fewer once a pass changes no code. ((T − Ŵ) H) is kept whole and
    updated by one product per block of `block` columns, within the block row by row (where the loop is bound by
    per-operation overhead: eight operations a column)."""
    WT = dequantize(quantized.codes, quantized.scale, quantized.zero).T.contiguous()  # [in, out], exact in fp32
    cols = WT.shape[0]
    g = cols // quantized.scale.shape[1]
    scale = quantized.scale.T.repeat_interleave(g, 0).contiguous()  # [in, out]
    zero = None if scheme.symmetric else quantized.zero.T.repeat_interleave(g, 0).contiguous()
    kept_scale = scale * (~pruned).T  # the scale where kept, 0 where pruned: a pruned code rounds to ŵ = 0
    H = H.float()
    inv_diag = (1.0 / torch.diagonal(H)).tolist()
    GT = H @ (target.float().T - WT)  # [in, out]: ((T − Ŵ) H)ᵀ
    u = torch.empty_like(WT[0])
    delta = torch.empty(min(block, cols), WT.shape[1], device=WT.device)
    for _ in range(passes):
        changed = torch.zeros((), device=WT.device)
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            Gb, Hb, D = GT[i1:i2].clone(), H[i1:i2, i1:i2], delta[: i2 - i1]
            for i in range(i2 - i1):
                j, row = i1 + i, WT[i1 + i]
                torch.add(row, Gb[i], alpha=inv_diag[j], out=u)
                u.div_(scale[j]).round_()
                if scheme.symmetric:
                    u.clamp_(scheme.qmin, scheme.qmax)
                else:
                    u.add_(zero[j]).clamp_(scheme.qmin, scheme.qmax).sub_(zero[j])
                u.mul_(kept_scale[j])
                torch.sub(u, row, out=D[i])
                row.copy_(u)
                if i + 1 < i2 - i1:
                    Gb[i + 1 :].addr_(Hb[i + 1 :, i], D[i], alpha=-1)
            GT.addmm_(H[:, i1:i2], D, alpha=-1)
            changed += D.count_nonzero()
        if not changed:
            break
    codes = quantize(WT.T, quantized.scale, quantized.zero, scheme)
    return Quantized(dequantize(codes, quantized.scale, quantized.zero, quantized.weight.dtype), codes,
                     quantized.scale, quantized.zero)


class ColumnQuantizer:
    """Rounds the columns of a weight kept transposed (WT: [in, out], a column of W is a contiguous row), one at a
    time, GPTQ's way: a group's scales are chosen when its first column is reached, from the columns as updated by
    the error of those before (GPTQ's `static_groups=False`, its default). Pruned positions, given as a float mask
    (1 kept), round to 0."""

    def __init__(self, scheme: QuantScheme, columns: int, rows: int, device, dtype: torch.dtype = torch.float32,
                 importance: Tensor | None = None):
        self.scheme, self.dtype = scheme, dtype
        self.importance = importance  # diag(H) [columns], inputs in WT's order: the mse observer's weights
        self.g = scheme.group_size or columns
        groups = -(-columns // self.g)
        self.scale = torch.empty(rows, groups, device=device)
        self.zero = torch.empty(rows, groups, device=device)
        self._s = self._z = None

    def start_group(self, WT: Tensor, i: int, pruned: Tensor | None = None) -> None:
        """Choose the scales of the group whose first column is i from WT's rows i : i + group, leaving out the
        positions `pruned` (bool, WT's shape) marks: those round to 0, which every range holds."""
        block = WT[i : i + self.g]
        if pruned is not None:
            block = block.masked_fill(pruned[i : i + self.g], 0)
        if self.scheme.observer == "mse":
            s, z = clipped_qparams(block, self._importance(i, block.shape[0], block.device), self.scheme, self.dtype)
        else:
            s, z = qparams(block.amin(0), block.amax(0), self.scheme, self.dtype)
        k = i // self.g
        self.scale[:, k], self.zero[:, k] = s, z
        self._s, self._z = s, z

    def choose_all(self, WT: Tensor, pruned: Tensor | None = None) -> None:
        """Choose every group's scales at once from WT ([in, out], the inputs in their own order): static groups;
        positions `pruned` marks left out, as in start_group."""
        if pruned is not None:
            WT = WT.masked_fill(pruned, 0)
        groups = WT.reshape(self.scale.shape[1], self.g, WT.shape[1])
        if self.scheme.observer == "mse":
            importance = self._importance(0, WT.shape[0], WT.device).reshape(self.scale.shape[1], self.g)
            s, z = clipped_qparams(groups, importance, self.scheme, self.dtype)
        else:
            s, z = qparams(groups.amin(1), groups.amax(1), self.scheme, self.dtype)  # [groups, out]
        self.scale.copy_(s.T)
        self.zero.copy_(z.T)
        self._static = (s.contiguous(), z.contiguous())

    def _importance(self, i: int, count: int, device) -> Tensor:
        if self.importance is None:
            return torch.ones(count, device=device)
        return self.importance[i : i + count].float()

    def grid(self, static: bool) -> tuple[Tensor, Tensor]:
        """The scales and zero points columns round with: every static group's ([groups, out], after choose_all), or
        the current group's ([1, out], after start_group)."""
        if static:
            return self._static
        return self._s.reshape(1, -1).contiguous(), self._z.reshape(1, -1).contiguous()

    def use_group(self, k: int) -> None:
        """Round the next columns with the (static) scales of group k."""
        self._s, self._z = self._static[0][k], self._static[1][k]

    def result(self, W: Tensor, r1: int, r2: int, dtype: torch.dtype) -> Quantized:
        """The Quantized of the rows r1:r2 of the rounded weight W ([rows, in], fp32, on the grid)."""
        scale, zero = self.scale[r1:r2].contiguous(), self.zero[r1:r2].contiguous()
        return Quantized(W.to(dtype).contiguous(), quantize(W, scale, zero, self.scheme), scale, zero)

    def round_(self, row: Tensor, keep: Tensor | None, out: Tensor) -> None:
        """out ← ŵ of one column (row of WT), 0 where keep is 0."""
        round_to_grid(row, self._s, self._z, self.scheme, out=out)
        if keep is not None:
            out.mul_(keep)


SCALE, ZERO = "weight_scale", "weight_zero_point"  # compressed-tensors' names for a linear's quantization parameters


def attach_quantization_(module: torch.nn.Module, quantized: Quantized) -> None:
    """Keep a linear's scales and zero points on it as buffers (fp32, [out, groups]), so that its state dict (what a
    partial run saves, what the writer packs) carries them; its weight already holds ŵ."""
    for name, value in ((SCALE, quantized.scale), (ZERO, quantized.zero)):
        module.register_buffer(name, value.to(module.weight.device), persistent=True)


def attach_expert_quantization_(experts: torch.nn.Module, param: str, index: int, quantized: Quantized) -> None:
    """An expert projection's scales and zero points, kept on its fused experts module as buffers `{param}_weight_scale`
    / `{param}_weight_zero_point` ([experts, out, groups], fp32), row `index` filled."""
    for part, value in ((SCALE, quantized.scale), (ZERO, quantized.zero)):
        name = f"{param}_{part}"
        buffer = getattr(experts, name, None)
        if buffer is None:
            buffer = torch.zeros(experts.num_experts, *value.shape, device=value.device)
            experts.register_buffer(name, buffer, persistent=True)
        buffer[index] = value.to(buffer.device)


def quantized_expert_params(state_keys) -> set[str]:
    """Names of the fused experts parameters (`EXPERTS.gate_up_proj`) whose quantization parameters appear among these
    state-dict keys."""
    suffix = "_" + SCALE
    return {k[: -len(suffix)] for k in state_keys if k.endswith(suffix)}


def expert_index(stored_name: str) -> int:
    """The expert a per-expert stored tensor belongs to (`...experts.3.w1.weight` -> 3): its last integer component."""
    return int([part for part in stored_name.split(".") if part.isdigit()][-1])


def split_expert_rows(W: Tensor, split: dict[str, Tensor], transposed: bool) -> dict[str, tuple[int, int]]:
    """Where each per-expert tensor a fused parameter is stored as (`split`: stored name -> [rows, in], from
    transformers' reverse conversion) lies in it: stored name -> (expert, first row of that expert's [out, in] view).
    Found by value, so no assumption is made about how the conversion orders gate and up."""
    found = {}
    for key, T in split.items():
        e = expert_index(key)
        view = W[e].t() if transposed else W[e]
        rows = T.shape[0]
        starts = [r for r in range(0, view.shape[0] - rows + 1, rows) if torch.equal(view[r : r + rows], T.to(view.dtype))]
        if T.dim() != 2 or not starts:
            raise ValueError(f"{key} is not a block of rows of expert {e} of its fused parameter")
        found[key] = (e, starts[0])
    return found


def quantized_modules(state_keys) -> set[str]:
    """Names of the linears whose quantization parameters appear among these state-dict keys."""
    return {k[: -len(SCALE) - 1] for k in state_keys if k.endswith("." + SCALE)}


# compressed-tensors' pack-quantized layout (what transformers with compressed-tensors >= 0.15 and vLLM read): for a
# linear P with weight [out, in], P.weight_packed int32 [out, ceil(in · bits / 32)] holds the codes offset by 2^(b−1)
# (unsigned), 32 / bits per word along the inputs, the first in the lowest bits; P.weight_scale [out, groups] in the
# model's dtype; P.weight_shape int64 [2]; asymmetric only, P.weight_zero_point int32 [ceil(out · bits / 32), groups],
# the zero points packed the same way along the outputs. Read from compressed-tensors 0.20.1's pack_to_int32 and
# checked against checkpoints it wrote (decoded bit for bit).
PACK_FORMAT = "pack-quantized"
PACKED, SHAPE = "weight_packed", "weight_shape"


def pack_int32(codes: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Signed codes (any integer dtype) packed into int32 words along `dim`, lowest bits first."""
    moved = codes.movedim(dim, -1).to(torch.int64) + (1 << (bits - 1))
    per = 32 // bits
    pad = -moved.shape[-1] % per
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (moved.reshape(*moved.shape[:-1], -1, per) << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the same 32 bits, as a signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: Tensor, bits: int, size: int, dim: int = -1) -> Tensor:
    """The signed codes (int16) of pack_int32, `size` of them along `dim`."""
    moved = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*moved.shape[:-1], -1)[..., :size] - (1 << (bits - 1))
    return values.to(torch.int16).movedim(-1, dim).contiguous()


def pack_quantized(W: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> dict[str, Tensor]:
    """The pack-quantized tensors of a linear whose weight W (model dtype) is on the grid of scale/zero
    ([out, groups]); the suffixes after P. as keys."""
    codes = quantize(W, scale, zero, scheme)
    if not torch.equal(dequantize(codes, scale, zero, W.dtype), W):
        raise ValueError("the weight is not on its quantization grid")
    parts = {PACKED: pack_int32(codes, scheme.bits), SCALE: scale.to(W.dtype).contiguous(),
             SHAPE: torch.tensor(list(W.shape), dtype=torch.int64)}
    if not scheme.symmetric:
        parts[ZERO] = pack_int32(zero.to(torch.int16), scheme.bits, dim=0)
    return parts


def unpack_quantized(parts: dict[str, Tensor], scheme: QuantScheme, name: str = "weight") -> Tensor:
    """The dense weight (the scale's dtype) of a linear's pack-quantized tensors."""
    try:
        rows, cols = (int(v) for v in parts[SHAPE].tolist())
        codes = unpack_int32(parts[PACKED], scheme.bits, cols)
        scale = parts[SCALE]
        zero = (unpack_int32(parts[ZERO], scheme.bits, rows, dim=0).float() if not scheme.symmetric
                else torch.zeros(scale.shape))
        if codes.shape != (rows, cols) or scale.shape != zero.shape or scale.shape[0] != rows or cols % scale.shape[1]:
            raise ValueError(f"shapes {tuple(codes.shape)}, scale {tuple(scale.shape)}, zero point {tuple(zero.shape)}")
    except (KeyError, ValueError, RuntimeError) as exc:
        raise LlmpruneError(f"{name}: its pack-quantized tensors do not fit together ({exc}); the checkpoint is damaged "
                            "or not written by a compressed-tensors writer.") from None
    return dequantize(codes, scale.float(), zero, scale.dtype)


def compressed_tensors_config(scheme: QuantScheme, *, ignore: list[str], global_sparsity: float, structure: str) -> dict:
    """config.json's quantization_config for a pack-quantized checkpoint, as compressed-tensors 0.20 writes it.
    The sparsity lives on as zeros in the values; `sparsity_config` says so in compressed-tensors' own words
    (format dense: its readers take it as information). Asymmetric checkpoints carry `dequantize: true`, since
    transformers 5.24 cannot build their packed zero points when it keeps the weights compressed (it then expands
    them to dense weights at load)."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "dynamic": False,
               "strategy": "group" if scheme.group_size else "channel", "group_size": scheme.group_size or None}
    config = {
        "quant_method": "compressed-tensors", "format": PACK_FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": PACK_FORMAT}},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {"format": "dense", "global_sparsity": global_sparsity, "sparsity_structure": structure,
                            "targets": ["Linear"], "ignore": ignore},
        "producer": "llmprune",
    }
    if not scheme.symmetric:
        config["dequantize"] = True
    return config


def scheme_of(config: dict) -> QuantScheme:
    """The scheme a pack-quantized quantization_config describes; an error naming what llmprune reads otherwise."""
    groups = config.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    if len(weights) != 1 or config.get("format") not in (PACK_FORMAT, None) or any(
            g.get("input_activations") for g in groups.values()):
        raise LlmpruneError("llmprune reads compressed-tensors checkpoints with one pack-quantized weight scheme and "
                            "16-bit activations (W4A16, W8A16); this one is not that; load it with transformers.")
    w = weights[0]
    strategy = w.get("strategy")
    if w.get("type", "int") != "int" or strategy not in ("group", "channel") or w.get("num_bits") not in (4, 8):
        raise LlmpruneError(f"unsupported quantization {w}: llmprune reads int4/int8 weights, group or channel strategy.")
    return QuantScheme(int(w["num_bits"]), int(w.get("group_size") or 0) if strategy == "group" else 0,
                       bool(w.get("symmetric", True)))
