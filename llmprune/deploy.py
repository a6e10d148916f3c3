"""SparseLinear and sparsify(model): pruned linears held only in their compressed form, run by our kernels.

On a CUDA GPU with CuPy, float16/bfloat16 decode steps (at most 16 tokens) go through the bitmask or 2:4
GEMV kernels (kernels.py); anything else (the CPU, float32, longer prefills) expands the weight for the
one call and uses torch's dense product, and says once why.
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
    """A linear layer whose weight lives only as compressed buffers (bitmask or 2:4 layout)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, layout: str):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear takes a 2-D weight; got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.layout = layout
        mask = weight != 0
        if layout == formats.SPARSE24:
            parts = formats.compress_24(weight)
            keep = formats.unpack_bits(parts["bitmask"], self.in_features)
            self.register_buffer("values", parts["compressed"].contiguous())
            self.register_buffer("meta", kernels.pack_24_meta(keep))
        elif layout == formats.BITMASK:
            parts = formats.compress_bitmask(weight)
            self.register_buffer("values", parts["compressed"].contiguous())
            self.register_buffer("row_start", kernels.row_starts(mask))
            self.register_buffer("words", kernels.pack_words(parts["bitmask"], self.in_features))
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
        """The weight as [out, in], expanded from the compressed buffers."""
        if self.layout == formats.SPARSE24:
            mask = kernels.unpack_24_meta(self.meta, self.in_features)
        else:
            mask = kernels.unpack_words(self.words, self.in_features)
        W = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        W[mask] = self.values.reshape(-1)
        return W

    def forward(self, x: Tensor) -> Tensor:
        reason = self._kernel_refusal(x)
        if reason is None and self.layout == formats.SPARSE24:
            y = kernels.sparse24_gemv(self.values, self.meta, x, self.in_features)
        elif reason is None:
            y = kernels.bitmask_gemv(self.values, self.row_start, self.words, x, self.in_features)
        else:
            if reason not in _warned:
                _warned.add(reason)
                log.warning("sparse kernels not used: %s; expanding the weight for each call instead", reason)
            y = nn.functional.linear(x, self.dense_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _kernel_refusal(self, x: Tensor) -> str | None:
        if x.device.type != "cuda":
            return "the kernels need a CUDA GPU"
        if x.dtype not in (torch.float16, torch.bfloat16):
            return f"the kernels take float16 or bfloat16, not {x.dtype}"
        if x.numel() // self.in_features > kernels.MAX_DECODE_TOKENS:
            return f"more than {kernels.MAX_DECODE_TOKENS} tokens per call (prefill) has no sparse GEMM kernel yet"
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "CuPy is not installed (pip install 'llmprune[cuda]')"
        return None

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
