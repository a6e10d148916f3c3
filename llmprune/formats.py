"""The sparse weight layouts of llmprune checkpoints, and the config blocks that name them.

Two tensor layouts, one per checkpoint, as compressed-tensors 0.14 defined them:

- ``sparse-bitmask``: for a weight W [rows, cols] saved under module path P:
  ``P.shape`` int64 [2]; ``P.compressed`` the kept values, row-major, 1-D in W's dtype;
  ``P.bitmask`` uint8 [rows, ceil(cols / 8)], bit j of byte k (little-endian bit order) flags element
  8k + j of the row as kept; ``P.row_offsets`` int64 [rows], the index in ``compressed`` where each row
  starts.
- ``sparse-24-bitmask`` (2:4 weights): ``P.shape`` int64 [2, 1]; ``P.compressed`` [rows, cols / 2],
  exactly two values per group of four inputs (a zero is kept where a group holds fewer than two
  non-zeros); ``P.bitmask`` as above.

Values are selected by their bit pattern (so -0.0 is kept as a value) and written back into zeros, which
makes compress → decompress bitwise exact for every dtype. A weight of more than two dimensions (fused MoE
experts [experts, out, in]) is stored as its [prod(leading), last] matrix with its whole shape in ``P.shape``
(llmprune's own config only).

Two config blocks name them (config.json → quantization_config):

- llmprune's own (``quant_method: llmprune``), the default: the weights live in ``llmprune-model*.safetensors``,
  and config.json's ``transformers_weights`` holds GUARD, a sentence that makes plain transformers (every 5.x,
  and 4.5x) stop with an error naming llmprune instead of loading the pruned linears as random weights. With
  llmprune imported, its quantizer (hf.py) points transformers at the real files and decompresses.
- compressed-tensors 0.14's (``quant_method: compressed-tensors``, ``sparsity_config``), exactly as that release
  wrote it, for users still on it. compressed-tensors 0.15 removed these compressors and transformers 5 with a
  newer compressed-tensors loads such files with random weights in the pruned linears, so it is written only on
  request.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

BITMASK = "sparse-bitmask"
SPARSE24 = "sparse-24-bitmask"
DENSE = "dense"
FORMATS = (DENSE, BITMASK, SPARSE24)
PARAMS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), SPARSE24: ("shape", "compressed", "bitmask")}
PART_NAMES = frozenset(PARAMS[BITMASK])
COMPRESSED_TENSORS_VERSION = "0.14.0.1"  # the layout version we write, for readers that check it

# the config blocks: llmprune's own, or compressed-tensors 0.14's
LLMPRUNE = "llmprune"
COMPRESSED_TENSORS = "compressed-tensors"
LAYOUT_VERSION = 1
from llmprune.files import WEIGHTS_INDEX, WEIGHTS_STEM  # noqa: E402,F401  (the file names of llmprune's layout)
# What plain transformers prints after "...nor a safetensors index file (*.safetensors.index.json): "
GUARD = ("this is an llmprune compressed sparse checkpoint, which plain transformers cannot load: pip install llmprune "
         "and run `import llmprune` before from_pretrained (or use llmprune.load), or write a copy that loads anywhere "
         "with `llmprune convert DIR --format dense --out DENSE_DIR`")

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32))


def _nonzero_bits(W: Tensor) -> Tensor:
    """True where the element's bit pattern is not all zero (-0.0 counts as a value)."""
    return W.view(_INT_VIEW[W.element_size()]) != 0 if W.is_floating_point() else W != 0


def pack_bits(mask: Tensor) -> Tensor:
    """bool [rows, cols] → uint8 [rows, ceil(cols / 8)], little-endian bit order within each byte."""
    rows, cols = mask.shape
    if mask.device.type == "cpu":  # numpy's packbits is ~40× faster than the tensor arithmetic below
        return torch.from_numpy(np.packbits(mask.contiguous().numpy(), axis=1, bitorder="little"))
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.int32, device=mask.device)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """uint8 [rows, ceil(cols / 8)] → bool [rows, cols]."""
    rows = packed.shape[0]
    bits = (packed.to(torch.int32).unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.view(rows, -1)[:, :cols]


def _select(W: Tensor, mask: Tensor) -> Tensor:
    """W[mask] (row-major order) for contiguous W. On the CPU through numpy's compress on the raw bits, which is
    ~3× faster than boolean indexing (measured on a 1536×576 weight) and takes any dtype, bfloat16 included."""
    if W.device.type != "cpu":
        return W[mask]
    bits = W.view(_INT_VIEW[W.element_size()]).reshape(-1).numpy()
    return torch.from_numpy(np.compress(mask.reshape(-1).numpy(), bits)).view(W.dtype)


def _as_matrix(W: Tensor) -> Tensor:
    """[..., cols] → [rows, cols], rows the product of the leading dimensions (a fused experts weight)."""
    if W.dim() < 2:
        raise ValueError(f"sparse layouts store weights of two or more dimensions; got shape {tuple(W.shape)}")
    return W.contiguous().reshape(-1, W.shape[-1])


def compress_bitmask(W: Tensor) -> dict[str, Tensor]:
    shape = list(W.shape)
    W = _as_matrix(W)
    mask = _nonzero_bits(W)
    counts = mask.sum(dim=1)
    return {"shape": torch.tensor(shape, dtype=torch.int64), "compressed": _select(W, mask),
            "bitmask": pack_bits(mask), "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def _keep_two_of_four(nibble: int) -> int:
    """The 2:4 layout's kept positions of a group of four whose non-zeros are the bits of `nibble` (at most two):
    the non-zeros, then the group's first zeros, so every group keeps exactly two."""
    keep = nibble
    for position in range(4):
        if bin(keep).count("1") < 2 and not keep >> position & 1:
            keep |= 1 << position
    return keep


# per byte of a packed non-zero mask (two groups of four, little-endian bits): the packed kept mask, and whether a
# group holds more than two non-zeros
_KEEP24 = np.array([_keep_two_of_four(b & 15) | _keep_two_of_four(b >> 4) << 4 for b in range(256)], dtype=np.uint8)
_OVER24 = np.array([bin(b & 15).count("1") > 2 or bin(b >> 4).count("1") > 2 for b in range(256)])


def _packed_nonzeros(W: Tensor) -> np.ndarray:
    """uint8 [rows, ceil(cols / 8)]: W's non-zero bits packed (little-endian), W a CPU matrix."""
    return np.packbits(_nonzero_bits(W).numpy(), axis=1, bitorder="little")


def holds_24(W: Tensor) -> bool:
    """Whether every group of four inputs of W ([..., cols], cols a multiple of 4) holds at most two non-zeros."""
    W = _as_matrix(W)
    if W.device.type != "cpu":
        return not bool((_nonzero_bits(W).view(W.shape[0], -1, 4).sum(-1) > 2).any())
    return not bool(_OVER24[_packed_nonzeros(W)].any())


def compress_24(W: Tensor) -> dict[str, Tensor]:
    """Raises ValueError where a group of four inputs holds more than two non-zeros. A 2-D weight's shape is stored
    [[rows], [cols]] as compressed-tensors 0.14 stores it; a fused weight's as its whole shape."""
    if W.dim() < 2 or W.shape[-1] % 4:
        raise ValueError(f"sparse-24-bitmask needs a weight with a multiple of 4 inputs; got shape {tuple(W.shape)}")
    shape = torch.tensor([[W.shape[0]], [W.shape[1]]] if W.dim() == 2 else list(W.shape), dtype=torch.int64)
    W = _as_matrix(W)
    rows, cols = W.shape
    if W.device.type == "cpu":  # two groups a byte through a table: ~10× faster than sums and top-k over groups of 4
        packed = _packed_nonzeros(W)
        if _OVER24[packed].any():
            raise ValueError("weight is not 2:4 sparse (a group of 4 inputs holds more than 2 non-zeros)")
        kept = _KEEP24[packed]
        if cols % 8:
            kept[:, -1] &= 0x0F  # the last byte holds one group; its upper half is padding
        keep = torch.from_numpy(np.unpackbits(kept, axis=1, count=cols, bitorder="little").view(bool))
        return {"shape": shape, "compressed": _select(W, keep).view(rows, cols // 2), "bitmask": torch.from_numpy(kept)}
    nonzero = _nonzero_bits(W).view(rows, cols // 4, 4)
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError("weight is not 2:4 sparse (a group of 4 inputs holds more than 2 non-zeros)")
    priority = nonzero.to(torch.int8) * 4 + torch.arange(3, -1, -1, dtype=torch.int8, device=W.device)
    keep = torch.zeros_like(nonzero).scatter_(-1, priority.topk(2, dim=-1).indices, True).view(rows, cols)
    return {"shape": shape, "compressed": _select(W, keep).view(rows, cols // 2), "bitmask": pack_bits(keep)}


def decompress(fmt: str, data: dict[str, Tensor], name: str = "weight") -> Tensor:
    """Dense weight from its stored parts; checks that the parts agree with one another."""
    missing = [p for p in ("shape", "compressed", "bitmask") if p not in data]
    if missing:
        raise LlmpruneError(f"{name}: compressed weight lacks {', '.join(missing)}; the checkpoint is corrupted.")
    if data["shape"].dtype.is_floating_point or data["shape"].numel() > 8:
        raise LlmpruneError(f"{name}: stored shape is not a list of sizes; the checkpoint is corrupted.")
    shape = [int(v) for v in data["shape"].flatten().tolist()]
    if len(shape) < 2 or min(shape) < 0 or math.prod(shape) > 1 << 40:
        raise LlmpruneError(f"{name}: stored shape {shape} is not a weight's shape; the checkpoint is corrupted.")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    bitmask, values = data["bitmask"], data["compressed"]
    if not values.is_floating_point():
        raise LlmpruneError(f"{name}: stored values are {values.dtype}, not floating point; the checkpoint is corrupted.")
    if tuple(bitmask.shape) != (rows, -(-cols // 8)) or bitmask.dtype not in (torch.uint8, torch.int8):
        raise LlmpruneError(f"{name}: bitmask of shape {tuple(bitmask.shape)} does not fit a {rows}×{cols} weight; the checkpoint is corrupted.")
    mask = unpack_bits(bitmask.view(torch.uint8), cols)
    kept = int(mask.sum())
    if kept != values.numel():
        raise LlmpruneError(f"{name}: the bitmask flags {kept} values but {values.numel()} are stored; the checkpoint is corrupted.")
    if fmt == SPARSE24 and kept != rows * cols // 2:
        raise LlmpruneError(f"{name}: a 2:4 weight must keep half its values, this one keeps {kept} of {rows * cols}; the checkpoint is corrupted.")
    if fmt == BITMASK and "row_offsets" in data:
        counts = mask.sum(dim=1)
        offsets = data["row_offsets"]
        if offsets.is_floating_point() or offsets.numel() != rows or not torch.equal(
                offsets.to(torch.int64).flatten(), torch.cumsum(counts, 0) - counts):
            raise LlmpruneError(f"{name}: row_offsets disagree with the bitmask; the checkpoint is corrupted.")
    W = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    W[mask] = values.flatten()
    return W.view(shape)


def compress(fmt: str, W: Tensor) -> dict[str, Tensor]:
    if fmt == BITMASK:
        return compress_bitmask(W)
    if fmt == SPARSE24:
        return compress_24(W)
    raise ValueError(f"unknown sparse format {fmt}")


def stored_values(fmt: str, parts: dict[str, Tensor]) -> int:
    """How many of the compressed weight's entries are values (not zero bits): every stored entry of the bitmask
    layout; in the 2:4 layout, the stored entries that are not padding zeros."""
    values = parts["compressed"]
    return values.numel() if fmt == BITMASK else int(_nonzero_bits(values).sum())


def stored_bytes(parts: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


# ---- config.json --------------------------------------------------------------------------------------


def llmprune_config(fmt: str, *, weights: str, global_sparsity: float, structure: str, ignore: list[str]) -> dict:
    """llmprune's quantization_config block: the tensor layout, the weights file transformers is to read (config.json's
    `transformers_weights` holds GUARD instead), and what was pruned. `sparse_kernels: true` makes from_pretrained
    build SparseLinear layers (deploy.py) instead of dense weights."""
    from llmprune.version import __version__

    return {"quant_method": LLMPRUNE, "format": fmt, "layout_version": LAYOUT_VERSION, "weights": weights,
            "global_sparsity": global_sparsity, "sparsity_structure": structure, "ignore": sorted(ignore),
            "sparse_kernels": False, "llmprune_version": __version__}


def sparsity_config(fmt: str, *, global_sparsity: float, structure: str, ignore: list[str]) -> dict:
    """The quantization_config block compressed-tensors 0.14 writes for a sparse-only checkpoint."""
    return {
        "version": COMPRESSED_TENSORS_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {"format": fmt, "targets": ["Linear"], "ignore": sorted(ignore),
                            "global_sparsity": global_sparsity, "sparsity_structure": structure},
        "transform_config": {},
    }


def choose_format(weights: dict[str, Tensor]) -> str:
    """sparse-24-bitmask when every weight is 2:4, else sparse-bitmask."""
    for W in weights.values():
        if W.dim() < 2 or W.shape[-1] % 4 or not holds_24(W):
            return BITMASK
    return SPARSE24
