"""SparseLinear and sparsify(model): pruned linears held only in their compressed form, run by our kernels.

A SparseLinear is packed for the device it will run on: on a CPU in the row bitmask layout of cpu_kernels.py
(compiled C++ for AVX-512, AVX2 or the baseline ISA; values in float32, bfloat16 or float16, any input dtype); on
a CUDA GPU of compute capability 8.0 or newer, with CuPy, in the tiles of kernels.py (2:4 or bitmask; float16 or
bfloat16 inputs). A layer moved to another kind of device repacks itself on its first call there. Where no kernel
applies (no C++ compiler, float32 on a GPU, an older GPU), the weight is expanded for the one call and torch's
dense product runs, and the reason is said once.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from llmprune import cpu_kernels, formats, kernels
from llmprune.models import find_blocks, find_linears, get_weight

log = logging.getLogger(__name__)
_warned: set[str] = set()
_CPU_BUFFERS = ("values", "row_masks", "row_offsets")
_CUDA_BUFFERS = {formats.SPARSE24: ("values", "meta"), formats.BITMASK: ("values", "offsets", "masks")}


class SparseLinear(nn.Module):
    """A linear layer whose weight lives only in compressed form: `layout` is the checkpoint's (bitmask or 2:4),
    `device` where it will run (the weight's device by default), `values_dtype` the kept values' dtype on a CPU
    (the weight's by default; a GPU's kernels take the input's)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, layout: str, *, device=None,
                 values_dtype: torch.dtype | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear takes a 2-D weight; got shape {tuple(weight.shape)}")
        if layout not in _CUDA_BUFFERS:
            raise ValueError(f"unknown layout {layout}")
        if values_dtype is not None and values_dtype not in cpu_kernels.VALUE_DTYPES:
            raise ValueError(f"values_dtype must be float32, bfloat16 or float16; got {values_dtype}")
        self.out_features, self.in_features = weight.shape
        self.layout = layout
        self.values_dtype = values_dtype
        self.target = ""
        self._pack(weight.detach(), torch.device(device) if device is not None else weight.device)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _pack(self, W: Tensor, device: torch.device) -> None:
        """(Re)pack W for `device`'s kind ("cpu" rows or "cuda" tiles), replacing the buffers held."""
        for name in set(_CPU_BUFFERS) | set(_CUDA_BUFFERS[self.layout]):
            self._buffers.pop(name, None)
        if device.type == "cuda":
            self.target = "cuda"
            W = W.to(device)
            if self.layout == formats.SPARSE24:
                parts = kernels.pack_24_tiles(W)
            else:
                parts = kernels.pack_bitmask_tiles(W)
            names = _CUDA_BUFFERS[self.layout]
        else:
            self.target = "cpu"
            parts = cpu_kernels.pack_rows(W, self.values_dtype or W.dtype)
            names = _CPU_BUFFERS
            self._density = int(parts[2][-1]) / max(1, W.numel())  # picks the kernel per call
        for name, part in zip(names, parts):
            self.register_buffer(name, part)

    @classmethod
    def from_linear(cls, module: nn.Module, layout: str | None = None, **kwargs) -> "SparseLinear":
        W = get_weight(module).detach()
        layout = layout or formats.choose_format({"w": W})
        return cls(W, getattr(module, "bias", None), layout, **kwargs)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dense_weight(self) -> Tensor:
        """The weight as [out, in], expanded from the compressed form."""
        if self.target == "cpu":
            return cpu_kernels.unpack_rows(self.values, self.row_masks, self.row_offsets, self.in_features)
        if self.layout == formats.SPARSE24:
            return kernels.unpack_24_tiles(self.values, self.meta, self.out_features, self.in_features)
        return kernels.unpack_bitmask_tiles(self.values, self.offsets, self.masks, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        kind = "cuda" if x.device.type == "cuda" else "cpu"
        if kind != self.target:  # moved with model.to(): pack once for the device it now runs on
            log.info("repacking a %d×%d sparse weight for %s", self.out_features, self.in_features, x.device)
            self._pack(self.dense_weight(), x.device)
        reason = self._kernel_refusal(x)
        if reason is None and kind == "cpu":
            y = cpu_kernels.matmul(x, self.values, self.row_masks, self.row_offsets, self.in_features,
                                   density=self._density)
        elif reason is None and self.layout == formats.SPARSE24:
            y = kernels.sparse24_matmul(self.values, self.meta, x, self.out_features, self.in_features)
        elif reason is None:
            y = kernels.bitmask_matmul(self.values, self.offsets, self.masks, x, self.out_features, self.in_features)
        else:
            if reason not in _warned:
                _warned.add(reason)
                log.warning("sparse kernels not used: %s; expanding the weight for each call instead", reason)
            y = nn.functional.linear(x, self.dense_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _kernel_refusal(self, x: Tensor) -> str | None:
        if x.device.type != "cuda":
            if not x.dtype.is_floating_point:
                return f"the CPU kernels take floating-point inputs, not {x.dtype}"
            return cpu_kernels.refusal()
        if x.dtype not in (torch.float16, torch.bfloat16):
            return f"the kernels take float16 or bfloat16, not {x.dtype}"
        if x.dtype != self.values.dtype:
            return f"input dtype {x.dtype} differs from the weight's {self.values.dtype}"
        return kernels.capability_refusal(x.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"packed_for={self.target}, values={str(self.values.dtype).removeprefix('torch.')}")


class DenseCPULinear(nn.Linear):
    """An nn.Linear left dense whose decode-sized products on a CPU run through our dense kernel
    (cpu_kernels.matmul_dense), where torch's took 3-4× longer (AMD CPUs, cpu_kernels.DENSE_TOKENS); anything else
    (more tokens, another device, inputs that need a gradient) takes F.linear. Made by changing a module's class in
    place (speed_up_dense), so its parameters (a tied lm_head's too), hooks and state dict stay as they are."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.device.type != "cpu" or w.dtype not in cpu_kernels.VALUE_DTYPES
                or not x.dtype.is_floating_point or x.numel() > cpu_kernels.DENSE_TOKENS * w.shape[1]
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return nn.functional.linear(x, w, self.bias)
        y = cpu_kernels.matmul_dense(x, w)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def speed_up_dense(model: nn.Module, *, min_weights: int = 1 << 16) -> int:
    """Make every plain nn.Linear of the model with at least `min_weights` weights on the CPU a DenseCPULinear, where
    cpu_kernels.dense_kernel_wanted() (AMD CPUs, or $LLMPRUNE_CPU_DENSE=ours) and the kernels build; returns how
    many. Smaller ones stay: per call, Python costs more than the bytes saved."""
    if not cpu_kernels.dense_kernel_wanted() or cpu_kernels.refusal() is not None:
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.numel() >= min_weights
                and module.weight.dtype in cpu_kernels.VALUE_DTYPES):
            module.__class__ = DenseCPULinear
            count += 1
    return count


def sparsify(model: nn.Module, *, min_sparsity: float = 0.3, device=None, values_dtype: torch.dtype | None = None) -> dict:
    """Swap every decoder-block linear at least `min_sparsity` sparse for a SparseLinear, in place, packed for
    `device` (each weight's own by default) with `values_dtype` values on a CPU.

    A linear whose every group of 4 inputs keeps at most 2 takes the 2:4 layout, others the bitmask. On a CPU the
    linears left dense (the lm_head) become DenseCPULinear where that is faster (speed_up_dense).
    Returns {"swapped": n, "dense_bytes": ..., "stored_bytes": ..., "dense_kernel": m}: the swapped weights' bytes,
    and how many dense linears run through our dense kernel.
    """
    swapped, dense_bytes, stored = 0, 0, 0
    for block, path, module in pruned_linears(model, min_sparsity):
        sparse = SparseLinear.from_linear(module, device=device, values_dtype=values_dtype)
        parent_name, _, child = path.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, sparse)
        W = get_weight(module)
        swapped += 1
        dense_bytes += W.numel() * W.element_size()
        stored += sparse.stored_bytes()
    on_cpu = torch.device(device).type == "cpu" if device is not None else True  # speed_up_dense checks each weight
    dense_kernel = speed_up_dense(model) if on_cpu else 0
    return {"swapped": swapped, "dense_bytes": dense_bytes, "stored_bytes": stored, "dense_kernel": dense_kernel}


def pruned_linears(model: nn.Module, min_sparsity: float = 0.3):
    """(block, path inside the block, module) of every decoder-block linear at least `min_sparsity` sparse."""
    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}"
        for name, module in list(find_linears(block, prefix).items()):
            W = get_weight(module)
            if W.numel() - int(torch.count_nonzero(W)) >= min_sparsity * W.numel():
                yield block, name[len(prefix) + 1:], module
