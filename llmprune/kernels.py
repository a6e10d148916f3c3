"""CUDA kernels for pruned weights: their tile layouts, packed in torch, the same arithmetic in torch (the CPU
reference the tests hold them to), run-time compilation with CuPy, and launch on torch tensors.

Both layouts cut a weight [rows, cols] into tiles of 16 rows x 32 inputs (zero-padded at the edges) and store
each tile in the order the tensor cores take it, so a warp reads a tile with coalesced loads and no shuffles:
- 2:4 (`pack_24_tiles`): per tile and lane, 8 kept values (16 bytes: the lane's mma.sp operand-A registers)
  and, for lanes 4g + t with t < 2, one metadata word: 9 bits per weight in 16-bit types.
- bitmask (`pack_bitmask_tiles`): per tile and lane a 16-bit mask of its 16 weights, the tile's kept values
  lane by lane (padded to 16 bytes), and the tile's offset: any sparsity, the kept values plus ~1.2 bits.
Kernels know nothing of models.
"""
from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)
SOURCES = ("sparse24_mma.cu", "bitmask_mma.cu")
TILE_ROWS, TILE_COLS = 16, 32
DECODE_TOKENS = 16  # up to here the decode kernels (tokens in registers); beyond, a prefill path (PREFILL)
MIN_CAPABILITY = (8, 0)  # mma.sp and mma.sync m16n8k16 for bf16 need Ampere or newer


def source_dir() -> Path:
    """The folder of the kernel sources: the package's copy (llmprune._cuda) in a wheel, the repository's kernels/
    otherwise. kernels/ has no __init__.py on purpose: as a regular package it shadowed the Hub's `kernels` package,
    which transformers (5.25 on) imports, for any Python started in the repository's root."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llmprune._cuda")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[1] / "kernels"


# ---- packing (CPU or GPU, pure torch) ---------------------------------------------------------------------


def tile_counts(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // TILE_ROWS), -(-cols // TILE_COLS)


def _padded(W: Tensor) -> Tensor:
    m_tiles, k_tiles = tile_counts(*W.shape)
    if W.shape == (m_tiles * TILE_ROWS, k_tiles * TILE_COLS):
        return W
    out = W.new_zeros(m_tiles * TILE_ROWS, k_tiles * TILE_COLS)
    out[: W.shape[0], : W.shape[1]] = W
    return out


def pack_24_tiles(W: Tensor, *, meta_layout: str = "khalf") -> tuple[Tensor, Tensor]:
    """W [rows, cols] with at most 2 non-zeros in every group of 4 inputs → (values [m_tiles, k_tiles, 32, 8] in
    W's dtype, meta int32 [m_tiles, k_tiles, 16]).

    Lane 4g + t's register r holds the two kept values (lower position first) of row g + 8·(r % 2), group
    t + 4·(r // 2) of the tile (the PTX ISA's operand-A layout of sparse mma.m16n8k32). Its metadata word
    (t < 2) holds 4 bits per group, first position in the low 2: with meta_layout "khalf", groups 4t .. 4t + 3
    of row g in bits 0-15 and of row g + 8 in bits 16-31; with "row", all 8 groups of row g + 8t.
    """
    rows, cols = W.shape
    if cols % 4:
        raise ValueError(f"2:4 needs a multiple of 4 inputs; got {cols}")
    m_tiles, k_tiles = tile_counts(rows, cols)
    groups = _padded(W).view(m_tiles * TILE_ROWS, k_tiles * 8, 4)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError("a group of 4 inputs has more than two non-zeros: not a 2:4 weight")
    position = torch.arange(4, device=W.device)
    # Keep the non-zeros, and fill a group's two slots with its first zero positions where it has fewer.
    first_two = torch.argsort((~nonzero).to(torch.int64) * 4 + position, dim=-1)[..., :2].sort(-1).values
    kept = torch.gather(groups, -1, first_two)  # [rows, groups, 2]
    values = (kept.view(m_tiles, 2, 8, k_tiles, 2, 4, 2)  # tile row 8·rlo + g, group 4·rhi + t, slot j
              .permute(0, 3, 2, 5, 4, 1, 6)  # → [mt, kt, g, t, rhi, rlo, j]
              .reshape(m_tiles, k_tiles, 32, 8).contiguous())
    codes = (first_two[..., 0] | (first_two[..., 1] << 2)).view(m_tiles, 2, 8, k_tiles, 2, 4)  # [mt, rlo, g, kt, half, c]
    if meta_layout == "khalf":
        codes = codes.permute(0, 3, 2, 4, 1, 5)  # word (g, half): row part rlo at bit 16·rlo, group c at 4·c
    elif meta_layout == "row":
        codes = codes.permute(0, 3, 2, 1, 4, 5)  # word (g, rlo): groups half·4 + c at 4·(4·half + c)
    else:
        raise ValueError(f"unknown meta_layout {meta_layout!r}")
    shifts = 4 * torch.arange(8, device=W.device, dtype=torch.int64)
    words = (codes.reshape(m_tiles, k_tiles, 16, 8) << shifts).sum(-1)
    return values, _as_int32(words)


def unpack_24_tiles(values: Tensor, meta: Tensor, rows: int, cols: int, *, meta_layout: str = "khalf") -> Tensor:
    """The dense [rows, cols] weight of pack_24_tiles' output."""
    m_tiles, k_tiles = values.shape[:2]
    kept = values.view(m_tiles, k_tiles, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6)  # → [mt, rlo, g, kt, rhi, t, j]
    kept = kept.reshape(m_tiles * TILE_ROWS, k_tiles * 8, 2)
    shifts = 4 * torch.arange(8, device=meta.device, dtype=torch.int64)
    codes = ((meta.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF  # [mt, kt, 16, 8]
    codes = codes.view(m_tiles, k_tiles, 8, 2, 2, 4)
    if meta_layout == "khalf":
        codes = codes.permute(0, 4, 2, 1, 3, 5)  # [mt, kt, g, half, rlo, c] → [mt, rlo, g, kt, half, c]
    else:
        codes = codes.permute(0, 3, 2, 1, 4, 5)  # [mt, kt, g, rlo, half, c] → [mt, rlo, g, kt, half, c]
    codes = codes.reshape(m_tiles * TILE_ROWS, k_tiles * 8)
    dense = values.new_zeros(m_tiles * TILE_ROWS, k_tiles * 8, 4)
    dense.scatter_(-1, (codes & 3).unsqueeze(-1), kept[..., :1])
    dense.scatter_(-1, (codes >> 2).unsqueeze(-1), kept[..., 1:])
    return dense.view(m_tiles * TILE_ROWS, k_tiles * TILE_COLS)[:rows, :cols]


def pack_bitmask_tiles(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W [rows, cols], any sparsity → (values [8·chunks] in W's dtype, offsets int32 [tiles + 1] in units of 8
    values, masks int16 [m_tiles, k_tiles, 32]).

    Lane 4g + t's 16 weights of a tile are element e = 8·s + 2·r + h: operand-A register r, half h, of the
    16-input step s (the PTX ISA's layout of mma.m16n8k16): row g + 8·(r % 2), input 16·s + 8·(r // 2) + 2t + h.
    """
    rows, cols = W.shape
    m_tiles, k_tiles = tile_counts(rows, cols)
    tiles = m_tiles * k_tiles
    lanes = (_padded(W).view(m_tiles, 2, 8, k_tiles, 2, 2, 4, 2)  # row 8·rlo + g; input 16·s + 8·rhi + 2t + h
             .permute(0, 3, 2, 6, 4, 5, 1, 7)  # → [mt, kt, g, t, s, rhi, rlo, h]: e = 8s + 4rhi + 2rlo + h
             .reshape(tiles, 32 * 16))
    keep = lanes != 0
    bits = 1 << torch.arange(16, device=W.device, dtype=torch.int64)
    masks = (keep.view(tiles, 32, 16).to(torch.int64) * bits).sum(-1)
    chunks = (keep.sum(1) + 7) // 8
    offsets = torch.zeros(tiles + 1, dtype=torch.int64, device=W.device)
    offsets[1:] = torch.cumsum(chunks, 0)
    if int(offsets[-1]) >= 2**31:
        raise LlmpruneError("a bitmask weight this large overflows the kernel's 32-bit tile offsets; split the layer.")
    slot = offsets[:-1, None] * 8 + torch.cumsum(keep, 1) - 1
    values = W.new_zeros(int(offsets[-1]) * 8)
    values[slot[keep]] = lanes[keep]
    masks = torch.where(masks >= 2**15, masks - 2**16, masks).to(torch.int16)
    return values, offsets.to(torch.int32), masks.view(m_tiles, k_tiles, 32)


def unpack_bitmask_tiles(values: Tensor, offsets: Tensor, masks: Tensor, rows: int, cols: int) -> Tensor:
    """The dense [rows, cols] weight of pack_bitmask_tiles' output."""
    m_tiles, k_tiles = masks.shape[:2]
    tiles = m_tiles * k_tiles
    bits = 1 << torch.arange(16, device=masks.device, dtype=torch.int64)
    keep = ((masks.to(torch.int64).view(tiles, 32, 1) & bits) != 0).view(tiles, 512)
    slot = offsets[:-1].to(torch.int64)[:, None] * 8 + torch.cumsum(keep, 1) - 1
    lanes = values.new_zeros(tiles, 512)
    lanes[keep] = values[slot[keep]]
    dense = (lanes.view(m_tiles, k_tiles, 8, 4, 2, 2, 2, 2)
             .permute(0, 6, 2, 1, 4, 5, 3, 7)  # [mt, kt, g, t, s, rhi, rlo, h] → [mt, rlo, g, kt, s, rhi, t, h]
             .reshape(m_tiles * TILE_ROWS, k_tiles * TILE_COLS))
    return dense[:rows, :cols]


def _as_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit patterns held in int64 → the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def reference_sparse24(values: Tensor, meta: Tensor, x: Tensor, rows: int, cols: int) -> Tensor:
    """y = x Wᵀ from the 2:4 tiles, float32 sums: what the 2:4 kernels compute."""
    W = unpack_24_tiles(values, meta, rows, cols)
    return (x.float() @ W.float().T).to(x.dtype)


def reference_bitmask(values: Tensor, offsets: Tensor, masks: Tensor, x: Tensor, rows: int, cols: int) -> Tensor:
    """y = x Wᵀ from the bitmask tiles, float32 sums: what the bitmask kernels compute."""
    W = unpack_bitmask_tiles(values, offsets, masks, rows, cols)
    return (x.float() @ W.float().T).to(x.dtype)


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
        raise LlmpruneError("the sparse kernels need CuPy: pip install 'llmprune[cuda]' or 'llmprune[cuda13]'.") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _function(source: str, name: str, device_index: int):
    """The compiled kernel `name` of `source` for this GPU (NVRTC; nvcc where NVRTC lacks the CUDA headers)."""
    cupy = _cupy()
    with cupy.cuda.Device(device_index) as device:
        code = (source_dir() / source).read_text()
        options = ("-std=c++17", f"--gpu-architecture=sm_{device.compute_capability}", f"-I{source_dir()}")
        try:
            return cupy.RawModule(code=code, options=options).get_function(name)
        except cupy.cuda.compiler.CompileException:
            if shutil.which("nvcc") is None:
                raise
            log.info("NVRTC could not compile %s; compiling with nvcc", source)
            return cupy.RawModule(code=code, options=options, backend="nvcc").get_function(name)


def _launch(source: str, name: str, grid: tuple, block: int, args: tuple, device: torch.device) -> None:
    """Launch on torch's current stream. Tensors go over as raw device pointers (no DLPack, no sync), so a launch
    can be captured in a CUDA graph."""
    import numpy as np

    cupy = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _function(source, name, index)
    raw = tuple(np.uint64(a.data_ptr()) if isinstance(a, Tensor) else np.int32(a) for a in args)
    with cupy.cuda.Device(index), _cupy_stream(cupy, torch.cuda.current_stream(device), index):
        function(grid, (block,), raw)


def _cupy_stream(cupy, stream: "torch.cuda.Stream", index: int):
    from_external = getattr(cupy.cuda.Stream, "from_external", None)  # CuPy 14 (ExternalStream is deprecated there)
    if from_external is not None and hasattr(stream, "__cuda_stream__"):
        return from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, index)


_KIND = {torch.float16: "f16", torch.bfloat16: "bf16"}
# Prefill (more than DECODE_TOKENS tokens) by our tiled GEMM ("mma") or by expanding the tiles to a dense weight
# for the one call and running cuBLAS ("expand"); each layout's default is the faster on an H200 (README: at 2048
# tokens expansion + cuBLAS ran at 0.84-0.87x dense for 2:4 and 0.81-0.87x for bitmask, our GEMMs at 0.31-0.34x and 0.08x).
PREFILL = {"2:4": "expand", "bitmask": "expand"}
_THREADS = 256
_GEMM_TILE = 128


def _tokens(x: Tensor, values: Tensor, cols: int) -> Tensor:
    """x as [tokens, stride]: contiguous, 16-byte aligned, stride = cols rounded up to 8 (zero-padded)."""
    if x.dtype not in _KIND or values.dtype != x.dtype:
        raise LlmpruneError(f"the sparse kernels take float16 or bfloat16 inputs and weights of the same dtype; "
                            f"got {x.dtype} and {values.dtype}.")
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {cols}")
    x2 = x.reshape(-1, cols)
    if cols % 8:
        x2 = torch.nn.functional.pad(x2, (0, 8 - cols % 8))
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # fresh storage: aligned
    return x2


def expand_24(values: Tensor, meta: Tensor, rows: int, cols: int) -> Tensor:
    """The dense [rows, cols] weight of 2:4 tiles, expanded on the GPU (a view of a [m_tiles·16, k_tiles·32] buffer)."""
    m_tiles, k_tiles = values.shape[:2]
    dense = torch.empty(m_tiles * TILE_ROWS, k_tiles * TILE_COLS, dtype=values.dtype, device=values.device)
    tiles = m_tiles * k_tiles
    _launch("sparse24_mma.cu", "sparse24_expand_tiles", (-(-tiles // 8),), _THREADS, (values, meta, dense, tiles, k_tiles),
            values.device)
    return dense[:rows, :cols]


def expand_bitmask(values: Tensor, offsets: Tensor, masks: Tensor, rows: int, cols: int) -> Tensor:
    """The dense [rows, cols] weight of bitmask tiles, expanded on the GPU (a view of a padded buffer)."""
    m_tiles, k_tiles = masks.shape[:2]
    dense = torch.empty(m_tiles * TILE_ROWS, k_tiles * TILE_COLS, dtype=values.dtype, device=values.device)
    tiles = m_tiles * k_tiles
    _launch("bitmask_mma.cu", "bitmask_expand_tiles", (-(-tiles // 8),), _THREADS,
            (values, offsets, masks, dense, tiles, k_tiles), values.device)
    return dense[:rows, :cols]


def sparse24_matmul(values: Tensor, meta: Tensor, x: Tensor, rows: int, cols: int, *, prefill: str | None = None) -> Tensor:
    """y = x Wᵀ on the GPU, W in the 2:4 tiles of pack_24_tiles; decode kernel up to 16 tokens, beyond it the tiled
    GEMM or expansion + cuBLAS (`prefill`: "mma" or "expand"; default PREFILL["2:4"])."""
    if x.numel() > DECODE_TOKENS * cols and (prefill or PREFILL["2:4"]) == "expand":
        return torch.nn.functional.linear(x, expand_24(values, meta, rows, cols))
    return _matmul("sparse24", (values, meta), values.shape[:2], x, rows, cols)


def bitmask_matmul(values: Tensor, offsets: Tensor, masks: Tensor, x: Tensor, rows: int, cols: int, *,
                   prefill: str | None = None) -> Tensor:
    """y = x Wᵀ on the GPU, W in the bitmask tiles of pack_bitmask_tiles; decode kernel up to 16 tokens, beyond it
    the tiled GEMM or expansion + cuBLAS (`prefill`: "mma" or "expand"; default PREFILL["bitmask"])."""
    if x.numel() > DECODE_TOKENS * cols and (prefill or PREFILL["bitmask"]) == "expand":
        return torch.nn.functional.linear(x, expand_bitmask(values, offsets, masks, rows, cols))
    return _matmul("bitmask", (values, offsets, masks), masks.shape[:2], x, rows, cols)


def _matmul(prefix: str, parts: tuple, tiles: tuple, x: Tensor, rows: int, cols: int) -> Tensor:
    """Launch `prefix`'s decode kernel (≤ DECODE_TOKENS tokens) or its tiled GEMM on the weight `parts`."""
    x2 = _tokens(x, parts[0], cols)
    m_tiles, k_tiles = tiles
    tokens = x2.shape[0]
    y = torch.empty(tokens, rows, dtype=x.dtype, device=x.device)
    if tokens:
        source, kind = f"{prefix}_mma.cu", _KIND[x.dtype]
        if tokens <= DECODE_TOKENS:
            _launch(source, f"{prefix}_decode_{kind}_n{1 if tokens <= 8 else 2}", (m_tiles,), _THREADS,
                    (*parts, x2, y, rows, k_tiles, x2.shape[1], tokens), x.device)
        else:
            grid = (-(-tokens // _GEMM_TILE), -(-m_tiles * TILE_ROWS // _GEMM_TILE))
            _launch(source, f"{prefix}_gemm_{kind}", grid, _THREADS,
                    (*parts, x2, y, rows, m_tiles, k_tiles, x2.shape[1], tokens), x.device)
    return y.view(*x.shape[:-1], rows)


@functools.lru_cache(maxsize=None)
def capability_refusal(device: torch.device) -> str | None:
    """Why the kernels cannot run on `device` (None when they can); asked on every forward, so remembered."""
    if device.type != "cuda":
        return "the kernels need a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"the kernels need compute capability 8.0 or newer (this GPU has {capability[0]}.{capability[1]})"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'llmprune[cuda]' or 'llmprune[cuda13]')"
    return None
