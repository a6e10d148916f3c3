"""CUDA kernels for compressed weights: run-time compilation with CuPy, launch on torch tensors, and the
kernels' layouts and arithmetic in plain torch (the CPU reference the tests check them against).

Layouts, packed once at load from the checkpoint's compressed-tensors parts (see formats.py):
- bitmask: kept values row-major (`values`), `row_start` int32 [rows] (index of each row's first value),
  `words` int32 [rows, ceil(cols / 32)]: bit t of words[o, w] flags input 32·w + t of row o as kept.
- 2:4: `values` [rows, cols / 2] (two per group of four inputs), `meta` int32 [rows, ceil(cols / 32)]:
  group g of row o has a 4-bit code in bits 4·(g mod 8) of meta[o, g / 8]: the first kept position
  in the low 2 bits, the second in the high 2.
Kernels know nothing of models.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

SOURCES = ("bitmask_gemv.cu", "sparse24_gemv.cu")
MAX_DECODE_TOKENS = 16  # the GEMV kernels keep one accumulator per token in registers
_BIT = 1 << torch.arange(32, dtype=torch.int64)


def source_dir() -> Path:
    """The folder of the .cu files: the package's copy in a wheel, the repository's kernels/ otherwise."""
    from importlib import resources

    try:
        return Path(str(resources.files("llmprune._cuda")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "kernels"


# ---- packing (CPU or GPU, pure torch) ---------------------------------------------------------------------


def pack_words(bitmask: Tensor, cols: int) -> Tensor:
    """uint8 [rows, ceil(cols / 8)] little-endian bitmask → int32 words [rows, ceil(cols / 32)]."""
    rows = bitmask.shape[0]
    nwords = -(-cols // 32)
    padded = torch.zeros(rows, nwords * 4, dtype=torch.int64, device=bitmask.device)
    padded[:, : bitmask.shape[1]] = bitmask.to(torch.int64)
    quads = padded.view(rows, nwords, 4)
    words = quads[..., 0] | (quads[..., 1] << 8) | (quads[..., 2] << 16) | (quads[..., 3] << 24)
    return _as_int32(words)


def unpack_words(words: Tensor, cols: int) -> Tensor:
    """int32 words [rows, ceil(cols / 32)] → bool [rows, cols]."""
    bits = (words.to(torch.int64).unsqueeze(-1) & _BIT.to(words.device)) != 0
    return bits.reshape(words.shape[0], -1)[:, :cols]


def row_starts(mask: Tensor) -> Tensor:
    """Index of each row's first kept value in the row-major values: int32 [rows]."""
    counts = mask.sum(dim=1)
    starts = torch.cumsum(counts, 0) - counts
    if int(counts.sum()) >= 2**31:
        raise LlmpruneError("a bitmask weight holds 2^31 or more kept values; too large for the kernel's int32 indices.")
    return starts.to(torch.int32)


def pack_24_meta(mask: Tensor) -> Tensor:
    """bool [rows, cols] with exactly two kept per group of 4 → int32 meta [rows, ceil(cols / 32)]."""
    rows, cols = mask.shape
    if cols % 4:
        raise ValueError(f"2:4 needs a multiple of 4 inputs; got {cols}")
    groups = mask.view(rows, cols // 4, 4)
    if not bool((groups.sum(-1) == 2).all()):
        raise ValueError("every group of 4 must keep exactly two values (the sparse-24-bitmask layout)")
    position = torch.arange(4, device=mask.device).expand_as(groups)
    first = torch.where(groups, position, 4).amin(-1)
    second = torch.where(groups, position, -1).amax(-1)
    codes = (first | (second << 2)).to(torch.int64)  # [rows, groups]
    ngroups = cols // 4
    padded = torch.zeros(rows, -(-ngroups // 8) * 8, dtype=torch.int64, device=mask.device)
    padded[:, :ngroups] = codes
    shifts = 4 * torch.arange(8, device=mask.device, dtype=torch.int64)
    words = (padded.view(rows, -1, 8) << shifts).sum(-1)
    return _as_int32(words)


def unpack_24_meta(meta: Tensor, cols: int) -> Tensor:
    """int32 meta → bool [rows, cols] mask of the kept positions."""
    rows = meta.shape[0]
    ngroups = cols // 4
    shifts = 4 * torch.arange(8, device=meta.device, dtype=torch.int64)
    codes = ((meta.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF
    codes = codes.reshape(rows, -1)[:, :ngroups]
    mask = torch.zeros(rows, ngroups, 4, dtype=torch.bool, device=meta.device)
    mask.scatter_(-1, (codes & 3).unsqueeze(-1), True)
    mask.scatter_(-1, (codes >> 2).unsqueeze(-1), True)
    return mask.view(rows, cols)


def _as_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit patterns held in int64 → the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ---- the kernels' arithmetic in torch (CPU reference) ------------------------------------------------------


def reference_bitmask_gemv(values: Tensor, row_start: Tensor, words: Tensor, x: Tensor, cols: int) -> Tensor:
    """y = x Wᵀ as the bitmask kernel computes it: each kept bit t of word w of row o takes the value at
    row_start[o] + (kept bits in the row's earlier words) + (kept bits below t in word w). Float32 sums."""
    bits = unpack_words(words, words.shape[1] * 32).view(words.shape[0], words.shape[1], 32)
    per_word = bits.sum(-1)
    before_word = torch.cumsum(per_word, 1) - per_word  # the warp's prefix sum over words
    rank = torch.cumsum(bits.to(torch.int64), -1) - 1  # kept bits below t in the word
    index = row_start.to(torch.int64)[:, None, None] + before_word[:, :, None] + rank
    W = torch.zeros(bits.shape, dtype=torch.float32, device=values.device)
    W[bits] = values.float()[index[bits]]
    return (x.float() @ W.reshape(words.shape[0], -1)[:, :cols].T).to(x.dtype)


def reference_sparse24_gemv(values: Tensor, meta: Tensor, x: Tensor, cols: int) -> Tensor:
    """y = x Wᵀ as the 2:4 kernel computes it: value 2g goes to the code's first position in group g, 2g + 1 to
    its second. Float32 sums."""
    mask = unpack_24_meta(meta, cols)
    W = torch.zeros(mask.shape, dtype=torch.float32, device=values.device)
    W[mask] = values.float().reshape(-1)
    return (x.float() @ W.T).to(x.dtype)


# ---- compilation and launch (CUDA, CuPy) -------------------------------------------------------------------


def nvcc_compile(source: Path, arch: str, out: Path) -> Path:
    """Compile one .cu file to a cubin with nvcc (what CI checks without a GPU); returns the cubin path."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise LlmpruneError("nvcc is not on PATH; install the CUDA toolkit to compile the kernels ahead of time.")
    cubin = out / f"{source.stem}.{arch}.cubin"
    proc = subprocess.run([nvcc, "-cubin", "-std=c++17", "-O3", f"-arch={arch}", f"-I{source.parent}", "-o", str(cubin), str(source)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nvcc failed on {source.name} for {arch}:\n{proc.stderr}")
    return cubin


def _cupy():
    try:
        import cupy
    except ImportError:
        raise LlmpruneError("the sparse kernels need CuPy: pip install 'llmprune[cuda]'.") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _module(source: str, device_index: int):
    cupy = _cupy()
    device = cupy.cuda.Device(device_index)
    with device:
        code = (source_dir() / source).read_text()
        return cupy.RawModule(code=code, options=("-std=c++17", f"--gpu-architecture=sm_{device.compute_capability}",
                                                  f"-I{source_dir()}"))


def _launch(source: str, name: str, grid: int, block: int, args: tuple, device: torch.device) -> None:
    """Launch on torch's current stream; tensors go over as zero-copy DLPack views of their raw bits."""
    cupy = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _module(source, index).get_function(name)
    converted = []
    for arg in args:
        if isinstance(arg, Tensor):  # CuPy has no bfloat16: hand over the 16-bit patterns
            arg = arg.detach()
            converted.append(cupy.from_dlpack(arg.view(torch.int16) if arg.element_size() == 2 and arg.is_floating_point() else arg))
        else:
            converted.append(arg)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
    with cupy.cuda.Device(index):
        function((grid,), (block,), tuple(converted), stream=stream)


_KIND = {torch.float16: "f16", torch.bfloat16: "bf16"}
WARPS_PER_BLOCK = 4


def _decode_checks(x: Tensor, values: Tensor, cols: int) -> tuple[Tensor, str, int]:
    if x.dtype not in _KIND or values.dtype != x.dtype:
        raise LlmpruneError(f"the sparse kernels take float16 or bfloat16 inputs and weights of the same dtype; "
                            f"got {x.dtype} and {values.dtype}.")
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {cols}")
    x2 = x.reshape(-1, cols).contiguous()
    if x2.shape[0] > MAX_DECODE_TOKENS:
        raise ValueError(f"the decode kernels take at most {MAX_DECODE_TOKENS} tokens; got {x2.shape[0]}")
    variant = "b4" if x2.shape[0] <= 4 else "b16"
    return x2, f"{_KIND[x.dtype]}_{variant}", x2.shape[0]


def bitmask_gemv(values: Tensor, row_start: Tensor, words: Tensor, x: Tensor, cols: int) -> Tensor:
    """y = x Wᵀ for at most 16 tokens, W in the bitmask layout, on the GPU."""
    x2, kind, batch = _decode_checks(x, values, cols)
    rows = row_start.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    grid = -(-rows // WARPS_PER_BLOCK)
    args = (values, row_start, words, x2, y, _i32(rows), _i32(cols), _i32(words.shape[1]), _i32(batch))
    _launch("bitmask_gemv.cu", f"bitmask_gemv_{kind}", grid, 32 * WARPS_PER_BLOCK, args, x.device)
    return y.view(*x.shape[:-1], rows)


def sparse24_gemv(values: Tensor, meta: Tensor, x: Tensor, cols: int) -> Tensor:
    """y = x Wᵀ for at most 16 tokens, W in the 2:4 layout, on the GPU."""
    x2, kind, batch = _decode_checks(x, values, cols)
    rows = values.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    grid = -(-rows // WARPS_PER_BLOCK)
    args = (values, meta, x2, y, _i32(rows), _i32(cols), _i32(batch))
    _launch("sparse24_gemv.cu", f"sparse24_gemv_{kind}", grid, 32 * WARPS_PER_BLOCK, args, x.device)
    return y.view(*x.shape[:-1], rows)


def _i32(value: int):
    import numpy as np

    return np.int32(value)
