"""SparseLinear and sparsify(model): pruned linears held only in their compressed form, run by our kernels.

On a CUDA GPU of compute capability 8.0 or newer, with CuPy, float16/bfloat16 inputs go through the 2:4 or
bitmask kernels (kernels.py: decode up to 16 tokens, tiled GEMM beyond); anything else (the CPU, float32,
older GPUs) expands the weight for the one call and uses torch's dense product, and says once why.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from llmprune import formats, kernels
from llmprune.models import find_blocks, find_linears, get_weight

log = logging.getLogger(__name__)
_warned: set[str] = set()


class SparseLinear(nn.Module):
    """A linear layer whose weight lives only as compressed tiles (bitmask or 2:4 layout of kernels.py)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, layout: str):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear takes a 2-D weight; got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.layout = layout
        if layout == formats.SPARSE24:
            values, meta = kernels.pack_24_tiles(weight)
            self.register_buffer("values", values)
            self.register_buffer("meta", meta)
        elif layout == formats.BITMASK:
            values, offsets, masks = kernels.pack_bitmask_tiles(weight)
            self.register_buffer("values", values)
            self.register_buffer("offsets", offsets)
            self.register_buffer("masks", masks)
        else:
            raise ValueError(f"unknown layout {layout}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Module, layout: str | None = None) -> "SparseLinear":
        W = get_weight(module).detach()
        layout = layout or formats.choose_format({"w": W})
        return cls(W, getattr(module, "bias", None), layout)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dense_weight(self) -> Tensor:
        """The weight as [out, in], expanded from the compressed tiles."""
        if self.layout == formats.SPARSE24:
            return kernels.unpack_24_tiles(self.values, self.meta, self.out_features, self.in_features)
        return kernels.unpack_bitmask_tiles(self.values, self.offsets, self.masks, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        reason = self._kernel_refusal(x)
        if reason is None and self.layout == formats.SPARSE24:
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
        if x.device.type == "cuda" and x.dtype not in (torch.float16, torch.bfloat16):
            return f"the kernels take float16 or bfloat16, not {x.dtype}"
        if x.dtype != self.values.dtype:
            return f"input dtype {x.dtype} differs from the weight's {self.values.dtype}"
        return kernels.capability_refusal(x.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}"


def sparsify(model: nn.Module, *, min_sparsity: float = 0.3) -> dict:
    """Swap every decoder-block linear at least `min_sparsity` sparse for a SparseLinear, in place.

    A linear whose every group of 4 inputs keeps at most 2 takes the 2:4 layout, others the bitmask.
    Returns {"swapped": n, "dense_bytes": ..., "stored_bytes": ...} for the swapped weights.
    """
    swapped, dense_bytes, stored = 0, 0, 0
    for block, path, module in pruned_linears(model, min_sparsity):
        sparse = SparseLinear.from_linear(module)
        parent_name, _, child = path.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, sparse)
        W = get_weight(module)
        swapped += 1
        dense_bytes += W.numel() * W.element_size()
        stored += sparse.stored_bytes()
    return {"swapped": swapped, "dense_bytes": dense_bytes, "stored_bytes": stored}


def pruned_linears(model: nn.Module, min_sparsity: float = 0.3):
    """(block, path inside the block, module) of every decoder-block linear at least `min_sparsity` sparse."""
    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}"
        for name, module in list(find_linears(block, prefix).items()):
            W = get_weight(module)
            if W.numel() - int(torch.count_nonzero(W)) >= min_sparsity * W.numel():
                yield block, name[len(prefix) + 1:], module
