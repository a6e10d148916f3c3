"""The kernels' tile layouts and arithmetic on the CPU (always), their nvcc compile (where nvcc is), and the kernels
themselves against the dense product (where a CUDA GPU of compute capability 8.0+ and CuPy are)."""
import shutil

import pytest
import torch

from llmprune import kernels
from llmprune.masks import Pattern, select_mask

SHAPES = [(16, 32), (5, 100), (33, 1000), (64, 4096), (3, 36), (40, 72)]


def pruned(rows, cols, sparsity=0.5, pattern=Pattern(), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    return W.masked_fill(select_mask(W.abs(), sparsity, pattern), 0).to(dtype)


@pytest.mark.parametrize("rows,cols", [s for s in SHAPES if s[1] % 4 == 0])
@pytest.mark.parametrize("meta_layout", ["khalf", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_24_tiles_round_trip(rows, cols, meta_layout, dtype):
    W = pruned(rows, cols, pattern=Pattern(2, 4), dtype=dtype, seed=rows)
    values, meta = kernels.pack_24_tiles(W, meta_layout=meta_layout)
    m_tiles, k_tiles = kernels.tile_counts(rows, cols)
    assert values.shape == (m_tiles, k_tiles, 32, 8) and values.dtype == dtype
    assert meta.shape == (m_tiles, k_tiles, 16) and meta.dtype == torch.int32
    assert torch.equal(kernels.unpack_24_tiles(values, meta, rows, cols, meta_layout=meta_layout), W)


def test_24_tiles_follow_the_operand_layout():
    """Lane 4g + t, register r: row g + 8(r % 2), group t + 4(r // 2), its two kept values lower position first;
    metadata word (g, t < 2) in the default layout: groups 4t..4t+3 of row g (bits 0-15) and row g + 8 (16-31)."""
    W = pruned(16, 32, pattern=Pattern(2, 4), seed=3)
    values, meta = kernels.pack_24_tiles(W)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for r in range(4):
            row, group = g + 8 * (r % 2), t + 4 * (r // 2)
            kept = W[row, 4 * group: 4 * group + 4].nonzero().flatten().tolist()
            assert values[0, 0, lane, 2 * r: 2 * r + 2].tolist() == W[row, [4 * group + k for k in kept]].tolist()
    for g in range(8):
        for t in range(2):
            word = int(meta[0, 0, 2 * g + t]) & 0xFFFFFFFF
            for half, row in enumerate((g, g + 8)):
                for c in range(4):
                    kept = W[row, 4 * (4 * t + c): 4 * (4 * t + c) + 4].nonzero().flatten().tolist()
                    assert (word >> (16 * half + 4 * c)) & 0xF == kept[0] | (kept[1] << 2)


def test_24_tiles_fill_groups_with_fewer_than_two_nonzeros():
    W = torch.zeros(16, 32)
    W[0, 3] = 1.0  # group 0 of row 0 keeps one value: the second slot is its first zero position
    values, meta = kernels.pack_24_tiles(W)
    assert int(meta[0, 0, 0]) & 0xF == 0 | (3 << 2)
    assert torch.equal(kernels.unpack_24_tiles(values, meta, 16, 32), W)


def test_24_tiles_refuse_three_nonzeros_in_a_group():
    with pytest.raises(ValueError, match="more than two"):
        kernels.pack_24_tiles(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitmask_tiles_round_trip(rows, cols, sparsity, dtype):
    W = pruned(rows, cols, sparsity, dtype=dtype, seed=cols) if sparsity < 1 else torch.zeros(rows, cols, dtype=dtype)
    values, offsets, masks = kernels.pack_bitmask_tiles(W)
    m_tiles, k_tiles = kernels.tile_counts(rows, cols)
    assert masks.shape == (m_tiles, k_tiles, 32) and masks.dtype == torch.int16
    assert offsets.shape == (m_tiles * k_tiles + 1,) and offsets.dtype == torch.int32
    assert values.numel() == 8 * int(offsets[-1]) and values.numel() < int(torch.count_nonzero(W)) + 8 * m_tiles * k_tiles
    assert torch.equal(kernels.unpack_bitmask_tiles(values, offsets, masks, rows, cols), W)


def test_bitmask_tiles_follow_the_operand_layout():
    """Lane 4g + t, element e = 8s + 2r + h: row g + 8(r % 2), input 16s + 8(r // 2) + 2t + h; values lane by lane."""
    W = pruned(16, 32, 0.6, seed=5)
    values, offsets, masks = kernels.pack_bitmask_tiles(W)
    expected_values, expected_masks = [], []
    for lane in range(32):
        g, t = divmod(lane, 4)
        bits = 0
        for e in range(16):
            s, r, h = e // 8, (e // 2) % 4, e % 2
            w = W[g + 8 * (r % 2), 16 * s + 8 * (r // 2) + 2 * t + h]
            if w != 0:
                bits |= 1 << e
                expected_values.append(float(w))
        expected_masks.append(bits)
    assert [int(m) & 0xFFFF for m in masks[0, 0]] == expected_masks
    n = len(expected_values)
    assert int(offsets[1]) == -(-n // 8) and values[:n].tolist() == expected_values


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_references_match_the_dense_product(rows, cols, batch, dtype, tol):
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    W = pruned(rows, cols, 0.6, dtype=dtype, seed=rows)
    y = kernels.reference_bitmask(*kernels.pack_bitmask_tiles(W), x, rows, cols)
    expected = x.double() @ W.double().T
    assert y.dtype == dtype and y.shape == (batch, rows)
    assert float((y.double() - expected).norm() / expected.norm()) < tol
    if cols % 4 == 0:
        W = pruned(rows, cols, pattern=Pattern(2, 4), dtype=dtype, seed=cols)
        y = kernels.reference_sparse24(*kernels.pack_24_tiles(W), x, rows, cols)
        expected = x.double() @ W.double().T
        assert float((y.double() - expected).norm() / expected.norm()) < tol


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed on this machine")
@pytest.mark.parametrize("source", kernels.SOURCES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_with_nvcc(source, arch, tmp_path):
    cubin = kernels.nvcc_compile(kernels.source_dir() / source, arch, tmp_path)
    assert cubin.stat().st_size > 0


def test_every_source_is_listed():
    assert sorted(p.name for p in kernels.source_dir().glob("*.cu")) == sorted(kernels.SOURCES)


def _gpu_ready():
    return torch.cuda.is_available() and kernels.capability_refusal(torch.device("cuda")) is None


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU of compute capability 8.0+ and CuPy (pip install 'llmprune[cuda]' or 'llmprune[cuda13]')")
GPU_SHAPES = SHAPES + [(4096, 4096), (11008, 4096), (4096, 11008), (300, 520)]
TOKENS = [1, 2, 5, 8, 9, 16, 17, 100, 128, 257, 2048]


def _relative_error(y, expected):
    assert torch.isfinite(y).all()
    return float((y.double() - expected).norm() / expected.norm())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows,cols", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_gpu_bitmask_kernels_match_the_dense_product(rows, cols, dtype, sparsity):
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    W = pruned(rows, cols, sparsity, dtype=dtype, seed=rows + cols).cuda()
    packed = kernels.pack_bitmask_tiles(W)
    for tokens in TOKENS:
        x = torch.randn(tokens, cols, device="cuda").to(dtype)
        expected = x.double() @ W.double().T
        y = kernels.bitmask_matmul(*packed, x, rows, cols)
        assert _relative_error(y, expected) < tol, f"{tokens} tokens"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows,cols", [s for s in GPU_SHAPES if s[1] % 4 == 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sparse24_kernels_match_the_dense_product(rows, cols, dtype):
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    W = pruned(rows, cols, pattern=Pattern(2, 4), dtype=dtype, seed=rows * cols).cuda()
    packed = kernels.pack_24_tiles(W)
    for tokens in TOKENS:
        x = torch.randn(tokens, cols, device="cuda").to(dtype)
        expected = x.double() @ W.double().T
        y = kernels.sparse24_matmul(*packed, x, rows, cols)
        assert _relative_error(y, expected) < tol, f"{tokens} tokens"


@pytest.mark.gpu
@gpu
def test_gpu_kernels_write_every_output_and_follow_the_stream():
    W = pruned(300, 520, pattern=Pattern(2, 4), dtype=torch.float16).cuda()
    packed = kernels.pack_24_tiles(W)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(3, 7, 520, device="cuda", dtype=torch.float16)
        y = kernels.sparse24_matmul(*packed, x, 300, 520)
    stream.synchronize()
    assert y.shape == (3, 7, 300)
    assert _relative_error(y, x.double() @ W.double().T) < 2e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows,cols", [(300, 520), (4096, 4096), (5, 100)])
def test_gpu_expansion_and_both_prefill_paths(rows, cols):
    W = pruned(rows, cols, 0.7, dtype=torch.float16, seed=7).cuda()
    packed = kernels.pack_bitmask_tiles(W)
    assert torch.equal(kernels.expand_bitmask(*packed, rows, cols), W)
    x = torch.randn(300, cols, device="cuda", dtype=torch.float16)
    expected = x.double() @ W.double().T
    for path in ("mma", "expand"):
        assert _relative_error(kernels.bitmask_matmul(*packed, x, rows, cols, prefill=path), expected) < 2e-3
    if cols % 4 == 0:
        W = pruned(rows, cols, pattern=Pattern(2, 4), dtype=torch.float16, seed=8).cuda()
        packed = kernels.pack_24_tiles(W)
        assert torch.equal(kernels.expand_24(*packed, rows, cols), W)
        expected = x.double() @ W.double().T
        for path in ("mma", "expand"):
            assert _relative_error(kernels.sparse24_matmul(*packed, x, rows, cols, prefill=path), expected) < 2e-3


@pytest.mark.parametrize("tokens", [1, 8, 9, 16, 17, 300])
@pytest.mark.parametrize("layout", ["2:4", "bitmask"])
def test_dispatch_launches_the_right_kernel_with_its_arguments(monkeypatch, tokens, layout):
    """Without a GPU: which kernel each token count reaches, its grid and argument order (as the .cu files declare)."""
    import re

    calls = []
    monkeypatch.setattr(kernels, "_launch", lambda source, name, grid, block, args, device: calls.append((source, name, grid, block, args)))
    rows, cols = 40, 100 if layout == "bitmask" else 104
    W = pruned(rows, cols, pattern=Pattern(2, 4) if layout == "2:4" else Pattern(), dtype=torch.float16)
    x = torch.randn(tokens, cols).half()
    m_tiles, k_tiles = kernels.tile_counts(rows, cols)
    if layout == "2:4":
        parts = kernels.pack_24_tiles(W)
        y = kernels.sparse24_matmul(*parts, x, rows, cols, prefill="mma")
    else:
        parts = kernels.pack_bitmask_tiles(W)
        y = kernels.bitmask_matmul(*parts, x, rows, cols, prefill="mma")
    assert y.shape == (tokens, rows) and len(calls) == 1
    source, name, grid, block, args = calls[0]
    prefix = "sparse24" if layout == "2:4" else "bitmask"
    assert source == f"{prefix}_mma.cu" and block == 256
    assert re.search(rf'DECODE\({name},|GEMM\({name},', (kernels.source_dir() / source).read_text())
    stride = 104 if cols % 8 == 0 else cols + 8 - cols % 8
    if tokens <= kernels.DECODE_TOKENS:
        assert name == f"{prefix}_decode_f16_n{1 if tokens <= 8 else 2}" and grid == (m_tiles,)
        assert args[:len(parts)] == parts and args[len(parts) + 2:] == (rows, k_tiles, stride, tokens)
    else:
        assert name == f"{prefix}_gemm_f16" and grid == (-(-tokens // 128), -(-m_tiles * 16 // 128))
        assert args[:len(parts)] == parts and args[len(parts) + 2:] == (rows, m_tiles, k_tiles, stride, tokens)
    x2, out = args[len(parts):len(parts) + 2]
    assert x2.shape == (tokens, stride) and torch.equal(x2[:, :cols], x) and not x2[:, cols:].any()
    assert out.data_ptr() == y.data_ptr()
