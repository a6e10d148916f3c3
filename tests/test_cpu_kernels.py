"""The CPU kernels (kernels/bitmask_cpu.cpp via llmprune/cpu_kernels.py): layout round trips, every instruction
set this machine has against the float64 product for every value dtype, odd shapes and token counts, the
fallback without a compiler, and SparseLinear on the CPU inside generate()."""
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune import cpu_kernels as ck
from llmprune import formats, masks

pytestmark = pytest.mark.skipif(ck.refusal() is not None, reason=f"CPU kernels unavailable: {ck.refusal()}")


def pruned(rows, cols, sparsity=0.5, *, pattern=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    if pattern is not None:
        keep = ~masks.select_mask(W.abs(), 0.0, masks.Pattern(*pattern))
    else:
        keep = torch.rand(rows, cols, generator=g) >= sparsity
    return (W * keep).to(dtype)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 150), sparsity=st.floats(0, 1),
       dtype=st.sampled_from(ck.VALUE_DTYPES), seed=st.integers(0, 2**16))
def test_pack_round_trip(rows, cols, sparsity, dtype, seed):
    W = pruned(rows, cols, sparsity, seed=seed).to(dtype)
    values, row_masks, offsets = ck.pack_rows(W)
    assert row_masks.shape == (rows, ck.padded_cols(cols) // 8) and row_masks.dtype == torch.uint8
    assert offsets[-1] == int(torch.count_nonzero(W)) and values.numel() == offsets[-1] + ck.VALUE_PAD
    assert torch.equal(ck.unpack_rows(values, row_masks, offsets, cols), W)


def test_pack_casts_values_and_keeps_the_mask():
    W = pruned(8, 64)
    values, row_masks, offsets = ck.pack_rows(W, torch.bfloat16)
    assert values.dtype == torch.bfloat16
    assert torch.equal(ck.unpack_rows(values, row_masks, offsets, 64), W.to(torch.bfloat16))


TOKENS = (1, 2, 3, 5, 8, 9, 13, 16, 17, 40)
SHAPES = ((1, 1), (3, 7), (17, 65), (64, 128), (130, 200), (33, 1000))


@pytest.mark.parametrize("isa", ck.available_isas())
@pytest.mark.parametrize("dtype", ck.VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("method", ("expand", "gather", "dense"))
def test_kernels_match_the_product(isa, dtype, method):
    for k, (rows, cols) in enumerate(SHAPES):
        W = pruned(rows, cols, 0.6, seed=k)
        values, row_masks, offsets = ck.pack_rows(W, dtype)
        W_stored = ck.unpack_rows(values, row_masks, offsets, cols).double()
        for tokens in TOKENS:
            x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
            want = x.double() @ W_stored.T
            got = ck.matmul(x, values, row_masks, offsets, cols, method=method, isa=isa)
            assert got.shape == (tokens, rows) and got.dtype == torch.float32
            tol = 1e-5 * (x.double().abs() @ W_stored.abs().T) + 1e-6
            assert bool(((got.double() - want).abs() <= tol).all()), (isa, dtype, method, rows, cols, tokens)


@pytest.mark.parametrize("isa", ck.available_isas())
def test_layouts_the_kernels_see(isa):
    """N:M and the extremes of sparsity: all zero rows, all kept rows, a row ending inside a mask byte."""
    cases = [pruned(16, 96, pattern=(2, 4)), pruned(12, 80, pattern=(1, 8)), torch.zeros(5, 70),
             torch.randn(6, 67), pruned(9, 129, 0.95)]
    for W in cases:
        values, row_masks, offsets = ck.pack_rows(W)
        for tokens in (1, 4, 12, 33):
            x = torch.randn(tokens, W.shape[1])
            torch.testing.assert_close(ck.matmul(x, values, row_masks, offsets, W.shape[1], isa=isa),
                                       x @ W.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ck.expand(values, row_masks, offsets, W.shape[1], isa=isa), W)


@pytest.mark.parametrize("isa", ck.available_isas())
def test_blocked_gemm_over_many_blocks(isa):
    """method 'dense' expands row blocks for torch's GEMM: blocks that do not divide the rows, one row, all rows."""
    W = pruned(33, 100, 0.5)
    values, row_masks, offsets = ck.pack_rows(W, torch.bfloat16)
    W = ck.unpack_rows(values, row_masks, offsets, 100).float()
    x = torch.randn(20, 100)
    xp = torch.nn.functional.pad(x, (0, row_masks.shape[1] * 8 - 100))
    for block in (1, 7, 33, 1000):
        y = ck.extension().matmul_blocked(xp, values, row_masks, offsets, ck.ISAS.index(isa), block)
        torch.testing.assert_close(y, x @ W.T, rtol=1e-5, atol=1e-5)


def test_the_method_follows_tokens_and_density():
    assert ck.method_for(1) == ck.method_for(ck.EXPAND_TOKENS) == "expand"
    assert ck.method_for(ck.EXPAND_TOKENS + 1) == ck.method_for(ck.GATHER_TOKENS) == "gather"
    assert ck.method_for(ck.GATHER_TOKENS + 1, 0.5) == "dense"
    # at high sparsity only kept values cost time: with 16-lane vectors on AMD, not with 8 nor on an Intel Xeon (measured)
    assert ck.method_for(4096, ck.GATHER_DENSITY, "avx512", "amd") == "gather"
    assert ck.method_for(4096, ck.GATHER_DENSITY, "avx512", "intel") == "dense"
    assert ck.method_for(4096, ck.GATHER_DENSITY, "avx512bf16", "amd") == "gather"
    assert ck.method_for(4096, ck.GATHER_DENSITY, "avx2", "amd") == ck.method_for(4096, ck.GATHER_DENSITY, "portable") == "dense"
    # bf16 activations and values: dot products for one pass over the weight, then bf16 GEMM blocks, where bf16 runs
    assert ck.method_for(ck.BF16_EXPAND_TOKENS, 0.3, "avx512bf16", "amd", bf16=True) == "expand"
    assert ck.method_for(ck.BF16_EXPAND_TOKENS + 1, 0.3, "avx512bf16", "amd", bf16=True) == "dense"
    assert ck.method_for(ck.BF16_EXPAND_TOKENS, 0.5, "avx512", bf16=True) == "gather"


def test_dense_blocks_hold_block_bytes():
    assert ck.block_rows(4096) == ck.BLOCK_BYTES // (4 * 4096)
    assert ck.block_rows(1 << 22) == 16  # never fewer than 16 rows
    assert ck.block_rows(4096, 2) == ck.BF16_BLOCK_BYTES // (2 * 4096)


@pytest.mark.skipif("avx512" not in ck.available_isas(), reason="this CPU has no AVX-512")
def test_both_avx512_fp32_expansions_give_the_same_outputs():
    """vexpandps from memory (Intel) and two table permutations (AMD): bit for bit the same sums."""
    before = ck.fp32_expansion()
    try:
        for k, (rows, cols) in enumerate(SHAPES):
            W = pruned(rows, cols, 0.6, seed=k)
            packed = ck.pack_rows(W)
            x = torch.randn(3, cols, generator=torch.Generator().manual_seed(k))
            outs = {}
            for how in ("load", "permute"):
                ck.set_fp32_expansion(how)
                assert ck.fp32_expansion() == how
                outs[how] = (ck.matmul(x, *packed, cols, method="expand", isa="avx512"),
                             ck.expand(*packed, cols, isa="avx512"))
            assert torch.equal(outs["load"][0], outs["permute"][0]) and torch.equal(outs["load"][1], W)
            torch.testing.assert_close(outs["load"][0], x @ W.T, rtol=1e-5, atol=1e-5)
    finally:
        ck.set_fp32_expansion(before)
    with pytest.raises(ValueError, match="neither"):
        ck.set_fp32_expansion("gather")


@pytest.mark.skipif("avx512bf16" not in ck.available_isas(), reason="this CPU has no AVX-512 BF16 + VBMI2")
@pytest.mark.parametrize("max_parts", [2, 3])
def test_bf16_dot_products_split_the_inputs_exactly(max_parts):
    """The AVX512_BF16 path splits x into as few bf16 parts as hold it (1 from bf16, 2 from fp16, 3 from fp32) and
    multiplies exactly: its sums are those of the AVX-512F path to fp32 rounding, for every token count it takes.
    x that needs more parts than the process lets through (fp32 with 2, or at more than one token; subnormal inputs,
    which the conversion flushes, always) runs the AVX-512F code itself, bit for bit."""
    module = ck.extension()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    assert module.bf16_parts(x.bfloat16().float()) == 1
    assert module.bf16_parts(x.half().float()) == 2
    assert module.bf16_parts(x) == 3
    assert module.bf16_parts(torch.zeros(1, 64)) == 1
    tiny = x.clone()
    tiny[2, 7] = 1e-40  # subnormal in fp32
    assert module.bf16_parts(tiny) == 4
    before = ck.bf16_dot_parts()
    ck.set_bf16_dot_parts(max_parts)
    try:
        assert ck.bf16_dot_parts() == max_parts
        reordered = {torch.float32: 0, torch.float16: 0, torch.bfloat16: 0}
        for k, (rows, cols) in enumerate(SHAPES):
            W = pruned(rows, cols, 0.5, seed=k)
            packed = ck.pack_rows(W, torch.bfloat16)
            W_stored = ck.unpack_rows(*packed, cols).double()
            for tokens in (1, 2, 3, 4, 5, 6, 7, 8):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    xt = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(dtype)
                    want = xt.double() @ W_stored.T
                    got = ck.matmul(xt.float(), *packed, cols, method="expand", isa="avx512bf16").double()
                    old = ck.matmul(xt.float(), *packed, cols, method="expand", isa="avx512").double()
                    scale = xt.double().abs() @ W_stored.abs().T
                    assert bool(((got - want).abs() <= 2e-6 * scale + 1e-7).all()), (rows, cols, tokens, dtype)
                    assert bool(((got - old).abs() <= 2e-6 * scale + 1e-7).all()), (rows, cols, tokens, dtype)
                    if dtype == torch.float32 and (tokens > 1 or max_parts == 2):
                        assert torch.equal(got, old), (rows, cols, tokens)
                    reordered[dtype] += not torch.equal(got, old)
            xs = torch.randn(3, cols, generator=torch.Generator().manual_seed(k))
            xs[1, cols // 2] = 1e-40
            assert torch.equal(ck.matmul(xs, *packed, cols, method="expand", isa="avx512bf16"),
                               ck.matmul(xs, *packed, cols, method="expand", isa="avx512")), (rows, cols)
        assert reordered[torch.float16] and reordered[torch.bfloat16], "16-bit inputs never took the dot products"
        if max_parts == 2:
            assert reordered[torch.float32] == 0, "fp32 inputs took the dot products with two parts allowed"
        else:
            assert reordered[torch.float32], "fp32 inputs never took the dot products with three parts allowed"
    finally:
        ck.set_bf16_dot_parts(before)
    with pytest.raises(ValueError, match="neither"):
        ck.set_bf16_dot_parts(4)


@pytest.mark.parametrize("isa", ck.available_isas())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_blocks_for_a_16_bit_gemm(isa, dtype):
    """matmul_blocked with x in the values' 16-bit dtype expands 16-bit blocks (vpexpandw or the scalar loop) for
    torch's GEMM in that dtype: the product of the dense 16-bit weight, which it equals to GEMM rounding."""
    module = ck.extension()
    for k, (rows, cols) in enumerate(SHAPES):
        W = pruned(rows, cols, 0.6, seed=k)
        values, row_masks, offsets = ck.pack_rows(W, dtype)
        kp = row_masks.shape[1] * 8
        x = torch.nn.functional.pad(torch.randn(19, cols, generator=torch.Generator().manual_seed(k)), (0, kp - cols)).to(dtype)
        dense = torch.nn.functional.pad(ck.unpack_rows(values, row_masks, offsets, cols), (0, kp - cols)).to(dtype)
        for block in (16, 1 << 20):
            y = module.matmul_blocked(x, values, row_masks, offsets, ck.ISAS.index(isa), block)
            assert y.dtype == dtype and y.shape == (19, rows)
            torch.testing.assert_close(y.float(), (x @ dense.T).float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="16-bit dtype"):
        module.matmul_blocked(x.half() if dtype == torch.bfloat16 else x.bfloat16(), values, row_masks, offsets, 0, 16)


@pytest.mark.parametrize("method", ["expand", "gather", "dense"])
def test_inputs_that_require_grad_run(method):
    """A model called outside torch.no_grad() hands the linears inputs that require grad: every path still runs."""
    W = pruned(24, 64, 0.5)
    x = torch.randn(3, 64, requires_grad=True)
    y = ck.matmul(x, *ck.pack_rows(W), 64, method=method)
    torch.testing.assert_close(y, (x @ W.T).detach(), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_take_the_bf16_gemm_where_bf16_runs(monkeypatch):
    W = pruned(100, 200, 0.5)
    packed = ck.pack_rows(W, torch.bfloat16)
    x = torch.randn(40, 200).bfloat16()
    want = x.double() @ ck.unpack_rows(*packed, 200).double().T
    module, seen = ck.extension(), []

    class Spy:
        def __getattr__(self, name):
            return getattr(module, name)

        def matmul_blocked(self, xp, *args):
            seen.append(xp.dtype)
            return module.matmul_blocked(xp, *args)

    monkeypatch.setattr(ck, "extension", lambda: Spy())
    for isa in ck.available_isas():
        seen.clear()
        y = ck.matmul(x, *packed, 200, isa=isa, method="dense")
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=2e-2)
        assert seen == [torch.bfloat16 if isa == "avx512bf16" else torch.float32], isa


def test_the_fp32_expansion_follows_the_vendor(monkeypatch):
    monkeypatch.delenv("LLMPRUNE_CPU_FP32_EXPAND", raising=False)
    assert ck._fp32_expand_load("intel") and not ck._fp32_expand_load("amd") and not ck._fp32_expand_load("other")
    monkeypatch.setenv("LLMPRUNE_CPU_FP32_EXPAND", "permute")
    assert not ck._fp32_expand_load("intel")
    monkeypatch.setenv("LLMPRUNE_CPU_FP32_EXPAND", "load")
    assert ck._fp32_expand_load("amd")


def test_fp32_activations_take_the_bf16_dot_products_by_vendor(monkeypatch):
    monkeypatch.delenv("LLMPRUNE_CPU_BF16_PARTS", raising=False)
    assert ck._bf16_max_parts("amd") == 3 and ck._bf16_max_parts("intel") == 2 and ck._bf16_max_parts("other") == 2
    monkeypatch.setenv("LLMPRUNE_CPU_BF16_PARTS", "3")
    assert ck._bf16_max_parts("intel") == 3
    monkeypatch.setenv("LLMPRUNE_CPU_BF16_PARTS", "2")
    assert ck._bf16_max_parts("amd") == 2
    monkeypatch.setenv("LLMPRUNE_CPU_BF16_PARTS", "many")
    assert ck._bf16_max_parts("amd") == 3


def test_inputs_of_other_dtypes_and_shapes():
    W = pruned(24, 64)
    values, row_masks, offsets = ck.pack_rows(W)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(ck.matmul(x, values, row_masks, offsets, 64), x @ W.T, rtol=1e-5, atol=1e-5)
    y = ck.matmul(x.to(torch.bfloat16), values, row_masks, offsets, 64)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    xt = torch.randn(64, 5).T  # not contiguous
    torch.testing.assert_close(ck.matmul(xt, values, row_masks, offsets, 64), xt @ W.T, rtol=1e-5, atol=1e-5)
    assert ck.matmul(torch.randn(0, 64), values, row_masks, offsets, 64).shape == (0, 24)
    with pytest.raises(ValueError, match="features"):
        ck.matmul(torch.randn(1, 63), values, row_masks, offsets, 64)


def test_an_isa_the_cpu_lacks_is_refused():
    missing = [isa for isa in ck.ISAS if isa not in ck.available_isas()]
    if not missing:
        pytest.skip("this CPU runs every instruction set")
    W = pruned(4, 64)
    with pytest.raises(ValueError, match="not available"):
        ck.matmul(torch.randn(1, 64), *ck.pack_rows(W), 64, isa=missing[0])


def test_the_best_isa_is_what_the_cpu_reports():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    flags = line.partition(":")[2].split()
    bf16 = {"avx512f", "avx512bw", "avx512_bf16", "avx512_vbmi2"} <= set(flags)
    want = ("avx512bf16" if bf16 else "avx512" if "avx512f" in flags else
            "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "portable")
    assert ck.best_isa() == want


def test_threads_split_rows_and_agree():
    W = pruned(301, 256)
    packed = ck.pack_rows(W)
    x = torch.randn(3, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ck.matmul(x, *packed, 256)
        torch.set_num_threads(max(2, before))
        many = ck.matmul(x, *packed, 256)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)  # rows are independent: the split changes no sum


def test_without_a_compiler_the_kernels_refuse_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-llmprune")
    monkeypatch.setenv("LLMPRUNE_KERNEL_CACHE", str(tmp_path))
    ck.extension.cache_clear()
    try:
        assert ck.extension() is None
        reason = ck.refusal()
        assert "no C++ compiler" in reason and "no-such-compiler-llmprune" in reason and "\n" not in reason
        assert ck.available_isas() == []
    finally:
        monkeypatch.undo()
        ck.extension.cache_clear()
        ck._refusal = None
    assert ck.refusal() is None


def test_the_build_is_cached():
    ck.extension()
    built = list(ck.cache_dir().glob("cpu-*/*.so"))
    assert built, "the compiled module lives in the cache folder"


# ---- SparseLinear on the CPU --------------------------------------------------------------------------------


def test_sparse_linear_runs_the_cpu_kernels(caplog):
    from llmprune.deploy import SparseLinear

    W = pruned(48, 96)
    bias = torch.randn(48)
    layer = SparseLinear(W, bias, formats.BITMASK)
    assert layer.target == "cpu" and layer.stored_bytes() < W.numel() * 4 * 0.6
    for tokens in (1, 6, 16, 40):
        x = torch.randn(tokens, 96)
        with caplog.at_level(logging.WARNING):
            torch.testing.assert_close(layer(x), x @ W.T + bias, rtol=1e-5, atol=1e-5)
    assert "not used" not in caplog.text
    torch.testing.assert_close(layer.dense_weight(), W)
    half = SparseLinear(W, None, formats.BITMASK, values_dtype=torch.bfloat16)
    assert half.values.dtype == torch.bfloat16
    x = torch.randn(2, 96)
    torch.testing.assert_close(half(x), x @ W.to(torch.bfloat16).float().T, rtol=1e-5, atol=1e-5)


def test_sparse_linear_24_on_the_cpu():
    from llmprune.deploy import SparseLinear

    W = pruned(32, 64, pattern=(2, 4))
    layer = SparseLinear(W, None, formats.SPARSE24)
    assert layer.target == "cpu"
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ W.T, rtol=1e-5, atol=1e-5)


def test_generate_with_cpu_kernels_equals_the_dense_pruned_model():
    import copy

    from conftest import tiny_model

    from llmprune import deploy
    from llmprune.models import find_linears

    model = tiny_model("llama").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in find_linears(layer, "").values():
                W = module.weight
                W.mul_(torch.rand_like(W) >= 0.5)
    sparse = copy.deepcopy(model)
    report = deploy.sparsify(sparse)
    assert report["swapped"] == 7 * len(model.model.layers)
    swapped = [m for m in sparse.modules() if isinstance(m, deploy.SparseLinear)]
    assert len(swapped) == report["swapped"] and all(m.target == "cpu" for m in swapped)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    dense_out = model.generate(ids, max_new_tokens=12, do_sample=False)
    sparse_out = sparse.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(dense_out, sparse_out)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_kernel_sources_do_not_shadow_the_hubs_kernels_package():
    # transformers imports the `kernels` package from PyPI; a kernels/__init__.py at the repository's root made
    # `import kernels` find ours instead for any Python started there (every model load then failed)
    import subprocess
    import sys
    from pathlib import Path

    from llmprune.kernels import source_dir

    root = Path(__file__).resolve().parents[1]
    assert (source_dir() / "bitmask_cpu.cpp").is_file()
    probe = ("import importlib.util; s = importlib.util.find_spec('kernels'); "
             "print('' if s is None or s.origin is None else s.origin)")
    origin = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert not origin.startswith(str(root / "kernels")), origin


# ---- linears left dense (the lm_head) -------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ck.available_isas())
@pytest.mark.parametrize("dtype", ck.VALUE_DTYPES, ids=str)
def test_the_dense_kernel_matches_the_product(isa, dtype):
    for k, (rows, cols) in enumerate(SHAPES + ((70, 576),)):
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(k)).to(dtype)
        for tokens in (1, 2, 3, 7, 8, 9, 16, 17):
            x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
            want = x.double() @ W.double().T
            got = ck.matmul_dense(x, W, isa=isa)
            assert got.shape == (tokens, rows) and got.dtype == torch.float32
            tol = 1e-5 * (x.double().abs() @ W.double().abs().T) + 1e-6
            assert bool(((got.double() - want).abs() <= tol).all()), (isa, dtype, rows, cols, tokens)


def test_the_dense_kernel_takes_strided_and_16_bit_inputs():
    W = torch.randn(40, 100)
    wide = torch.randn(3, 2, 130)
    x = wide[..., 10:110]  # rows 130 apart, a view
    torch.testing.assert_close(ck.matmul_dense(x, W), x @ W.T, rtol=1e-5, atol=1e-5)
    xb = torch.randn(5, 100).to(torch.bfloat16)
    got = ck.matmul_dense(xb, W)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), xb.float() @ W.T, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="features"):
        ck.matmul_dense(torch.randn(2, 99), W)


def test_the_dense_kernel_is_chosen_by_vendor_or_by_the_environment(monkeypatch):
    try:
        for forced, vendor, want in ((None, "amd", True), (None, "intel", False), ("ours", "intel", True),
                                     ("torch", "amd", False), ("fast", "amd", True)):
            ck.dense_kernel_wanted.cache_clear()
            if forced is None:
                monkeypatch.delenv("LLMPRUNE_CPU_DENSE", raising=False)
            else:
                monkeypatch.setenv("LLMPRUNE_CPU_DENSE", forced)
            monkeypatch.setattr(ck, "_default_vendor", lambda vendor=vendor: vendor)
            assert ck.dense_kernel_wanted() is want, (forced, vendor)
    finally:
        ck.dense_kernel_wanted.cache_clear()


def test_a_tied_head_runs_through_the_dense_kernel_and_stays_tied(monkeypatch):
    from conftest import tiny_model

    from llmprune import deploy

    monkeypatch.setenv("LLMPRUNE_CPU_DENSE", "ours")
    ck.dense_kernel_wanted.cache_clear()
    try:
        model = tiny_model("llama").eval()
        model.config.tie_word_embeddings = True
        model.tie_weights()
        head = model.get_output_embeddings()
        assert head.weight is model.get_input_embeddings().weight
        ids = torch.randint(0, model.config.vocab_size, (1, 7))
        with torch.no_grad():
            before = model(ids).logits
        dense_out = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert deploy.speed_up_dense(model, min_weights=1) > 0
        assert type(head) is deploy.DenseCPULinear and isinstance(head, torch.nn.Linear)
        assert head.weight is model.get_input_embeddings().weight and "lm_head.weight" in model.state_dict()
        calls = []
        original = ck.matmul_dense
        monkeypatch.setattr(ck, "matmul_dense", lambda *a, **k: calls.append(1) or original(*a, **k))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        assert calls, "a 7-token call goes through the dense kernel"
        assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), dense_out)
        calls.clear()
        model(torch.randint(0, model.config.vocab_size, (2, 40))).logits.sum().backward()  # 80 tokens, gradients: F.linear
        assert not calls and head.weight.grad is not None
    finally:
        ck.dense_kernel_wanted.cache_clear()


def test_sparsify_reports_the_dense_kernel(monkeypatch):
    from conftest import tiny_model

    from llmprune import deploy

    for forced, want in (("torch", 0), ("ours", None)):
        monkeypatch.setenv("LLMPRUNE_CPU_DENSE", forced)
        ck.dense_kernel_wanted.cache_clear()
        model = tiny_model("llama").eval()
        monkeypatch.setattr(deploy, "speed_up_dense", lambda m, _real=deploy.speed_up_dense: _real(m, min_weights=1))
        report = deploy.sparsify(model)
        monkeypatch.undo()
        heads = [m for m in model.modules() if type(m) is deploy.DenseCPULinear]
        assert report["dense_kernel"] == len(heads) and (len(heads) == 0 if want == 0 else len(heads) >= 1)
    ck.dense_kernel_wanted.cache_clear()
