"""The compressed-tensors sparse layouts: exact round trips, layout details, corruption, whole checkpoints."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune import formats as c
from llmprune.checkpoint import read_format
from llmprune.errors import LlmpruneError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def sparse(rows, cols, dtype, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) > density] = 0
    return W.to(dtype)


def two_four(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    drop = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    W.view(rows, cols // 4, 4).scatter_(-1, drop, 0.0)
    return W.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["half", "zero_rows", "no_zeros", "all_zero", "negative_zero", "odd_width"])
def test_bitmask_round_trip_is_bitwise(dtype, case):
    W = sparse(9, 24 if case != "odd_width" else 19, dtype)
    if case == "zero_rows":
        W[[0, 4, 8]] = 0
    elif case == "no_zeros":
        W = torch.randn(9, 24).to(dtype) + 10
    elif case == "all_zero":
        W = torch.zeros(9, 24, dtype=dtype)
    elif case == "negative_zero":
        W[1, :5] = -0.0
    parts = c.compress_bitmask(W)
    assert parts["shape"].tolist() == list(W.shape) and parts["shape"].dtype == torch.int64
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].shape == (W.shape[0], -(-W.shape[1] // 8))
    assert parts["row_offsets"].dtype == torch.int64 and parts["compressed"].dtype == dtype
    assert bitwise_equal(c.decompress(c.BITMASK, parts), W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["exact", "fewer_nonzeros", "zero_rows", "negative_zero"])
def test_24_round_trip_is_bitwise(dtype, case):
    W = two_four(8, 32, dtype)
    if case == "fewer_nonzeros":
        W[:, ::4] = 0
    elif case == "zero_rows":
        W[[2, 5]] = 0
    elif case == "negative_zero":
        W[3][W[3] != 0] = -0.0
    parts = c.compress_24(W)
    assert parts["shape"].shape == (2, 1) and parts["shape"].flatten().tolist() == [8, 32]
    assert parts["compressed"].shape == (8, 16)
    assert bitwise_equal(c.decompress(c.SPARSE24, parts), W)


def test_24_refuses_a_weight_that_is_not_24():
    W = two_four(4, 16, torch.float32)
    W[0, :4] = 1.0
    with pytest.raises(ValueError, match="not 2:4"):
        c.compress_24(W)
    assert c.choose_format({"a": W}) == c.BITMASK
    assert c.choose_format({"a": two_four(4, 16, torch.float32)}) == c.SPARSE24


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), seed=st.integers(0, 10_000), density=st.floats(0, 1))
def test_packing_matches_numpys_little_endian_packbits(rows, cols, seed, density):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    packed = c.pack_bits(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(c.unpack_bits(packed, cols), mask)


def test_row_offsets_index_each_row():
    W = sparse(6, 16, torch.float32)
    parts = c.compress_bitmask(W)
    for r in range(6):
        start = int(parts["row_offsets"][r])
        row = W[r][W[r] != 0]
        assert torch.equal(parts["compressed"][start:start + row.numel()], row)


@pytest.mark.parametrize("damage,fragment", [
    ("drop_value", "flags"), ("bad_offsets", "row_offsets"), ("bad_shape", "bitmask of shape"), ("odd_24", "keep half"),
])
def test_corruption_is_named(damage, fragment):
    if damage == "odd_24":
        parts = c.compress_24(two_four(4, 16, torch.float32))
        parts["bitmask"][0, 0] |= 0xFF  # a whole group of 4 kept: consistent counts, but not 2:4
        kept = int(c.unpack_bits(parts["bitmask"], 16).sum())
        parts["compressed"] = torch.zeros(kept)
        fmt = c.SPARSE24
    else:
        parts, fmt = c.compress_bitmask(sparse(5, 16, torch.float32)), c.BITMASK
        if damage == "drop_value":
            parts["compressed"] = parts["compressed"][:-1]
        elif damage == "bad_offsets":
            parts["row_offsets"][2] += 1
        else:
            parts["shape"] = torch.tensor([5, 40])
    with pytest.raises(LlmpruneError, match=fragment):
        c.decompress(fmt, parts, "model.layers.0.mlp.up_proj")


def test_unknown_format_in_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-99-bytemask"}}}))
    with pytest.raises(LlmpruneError, match="sparse-99-bytemask"):
        read_format(tmp_path)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_24_keeps_the_non_zeros_then_the_first_zeros_of_each_group(rows, groups, seed):
    """The table-driven 2:4 compressor against the rule worked group by group (and the bits -0.0 carries)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, groups * 4, generator=g)
    for r in range(rows):
        for k in range(groups):
            kept = torch.randperm(4, generator=g)[: int(torch.randint(0, 3, (), generator=g))]
            group = torch.zeros(4)
            group[kept] = W[r, 4 * k + kept]
            if int(torch.randint(0, 4, (), generator=g)) == 0 and len(kept):
                group[kept[0]] = -0.0
            W[r, 4 * k: 4 * k + 4] = group
    parts = c.compress_24(W)
    bits = W.view(torch.int32) != 0
    expected = torch.zeros_like(bits)
    for r in range(rows):
        for k in range(groups):
            keep = [j for j in range(4) if bits[r, 4 * k + j]]
            keep += [j for j in range(4) if j not in keep][: 2 - len(keep)]
            expected[r, [4 * k + j for j in keep]] = True
    assert torch.equal(c.unpack_bits(parts["bitmask"], groups * 4), expected)
    assert bitwise_equal(c.decompress(c.SPARSE24, parts), W)
    assert c.holds_24(W)
