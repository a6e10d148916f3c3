"""The kernels' layouts and arithmetic on the CPU (always), their nvcc compile (where nvcc is), and the kernels
themselves against the CPU reference (where a CUDA GPU and CuPy are)."""
import shutil

import pytest
import torch

from llmprune import formats, kernels
from llmprune.masks import Pattern, select_mask

SHAPES = [(8, 32), (5, 100), (33, 1000), (64, 4096), (3, 36)]


def pruned(rows, cols, sparsity=0.5, pattern=Pattern(), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    return W.masked_fill(select_mask(W.abs(), sparsity, pattern), 0).to(dtype)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_words_round_trip_the_checkpoint_bitmask(rows, cols):
    W = pruned(rows, cols, 0.7)
    parts = formats.compress_bitmask(W)
    words = kernels.pack_words(parts["bitmask"], cols)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-cols // 32))
    assert torch.equal(kernels.unpack_words(words, cols), W != 0)
    assert torch.equal(kernels.row_starts(W != 0).long(), parts["row_offsets"])


@pytest.mark.parametrize("rows,cols", [s for s in SHAPES if s[1] % 4 == 0])
def test_24_meta_round_trips_and_orders_positions(rows, cols):
    W = pruned(rows, cols, pattern=Pattern(2, 4))
    parts = formats.compress_24(W)
    keep = formats.unpack_bits(parts["bitmask"], cols)
    meta = kernels.pack_24_meta(keep)
    assert meta.shape == (rows, -(-cols // 32)) and meta.dtype == torch.int32
    assert torch.equal(kernels.unpack_24_meta(meta, cols), keep)
    first_group = keep[0, :4].nonzero().flatten().tolist()  # low 2 bits: first position, next 2: second
    assert int(meta[0, 0]) & 0xF == first_group[0] | (first_group[1] << 2)


def test_24_meta_refuses_groups_without_two_kept():
    with pytest.raises(ValueError, match="exactly two"):
        kernels.pack_24_meta(torch.tensor([[True, True, True, False]]))


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_reference_bitmask_gemv_matches_the_dense_product(rows, cols, batch, dtype, tol):
    W = pruned(rows, cols, 0.6, dtype=dtype, seed=rows)
    parts = formats.compress_bitmask(W)
    words = kernels.pack_words(parts["bitmask"], cols)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = kernels.reference_bitmask_gemv(parts["compressed"], kernels.row_starts(W != 0), words, x, cols)
    expected = x.double() @ W.double().T
    assert y.dtype == dtype and y.shape == (batch, rows)
    assert float((y.double() - expected).norm() / expected.norm()) < tol


@pytest.mark.parametrize("rows,cols", [s for s in SHAPES if s[1] % 4 == 0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_reference_sparse24_gemv_matches_the_dense_product(rows, cols, dtype, tol):
    W = pruned(rows, cols, pattern=Pattern(2, 4), dtype=dtype, seed=cols)
    parts = formats.compress_24(W)
    meta = kernels.pack_24_meta(formats.unpack_bits(parts["bitmask"], cols))
    x = torch.randn(4, cols, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = kernels.reference_sparse24_gemv(parts["compressed"], meta, x, cols)
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
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and CuPy (pip install 'llmprune[cuda]')")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows,cols", SHAPES + [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernels_match_the_reference(rows, cols, batch, dtype):
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    x = torch.randn(batch, cols).to(dtype)
    W = pruned(rows, cols, 0.6, dtype=dtype)
    parts = formats.compress_bitmask(W)
    words = kernels.pack_words(parts["bitmask"], cols)
    starts = kernels.row_starts(W != 0)
    expected = x.double() @ W.double().T
    y = kernels.bitmask_gemv(parts["compressed"].cuda(), starts.cuda(), words.cuda(), x.cuda(), cols)
    assert float((y.cpu().double() - expected).norm() / expected.norm()) < tol
    if cols % 4 == 0:
        W = pruned(rows, cols, pattern=Pattern(2, 4), dtype=dtype)
        parts = formats.compress_24(W)
        meta = kernels.pack_24_meta(formats.unpack_bits(parts["bitmask"], cols))
        expected = x.double() @ W.double().T
        y = kernels.sparse24_gemv(parts["compressed"].cuda(), meta.cuda(), x.cuda(), cols)
        assert float((y.cpu().double() - expected).norm() / expected.norm()) < tol
