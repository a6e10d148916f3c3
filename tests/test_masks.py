import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern, check_sparsity, parse_pattern, pattern_holds, select_mask

patterns = st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 8), (2, 5)])


@settings(max_examples=60, deadline=None)
@given(nm=patterns, rows=st.integers(1, 12), groups=st.integers(1, 6), seed=st.integers(0, 2**16), ties=st.booleans())
def test_nm_mask_keeps_exactly_n_per_group(nm, rows, groups, seed, ties):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, groups * m), generator=g).float() if ties else torch.rand(rows, groups * m, generator=g)
    mask = select_mask(scores, 0.0, Pattern(n, m))
    kept = (~mask).reshape(rows, groups, m).sum(-1)
    assert torch.all(kept == n)
    weight = torch.randn(rows, groups * m, generator=g).masked_fill(mask, 0)
    assert pattern_holds(weight, Pattern(n, m))
    # the pruned scores are never above the kept ones within a group
    grouped, gmask = scores.reshape(rows, groups, m), mask.reshape(rows, groups, m)
    pruned_max = grouped.masked_fill(~gmask, -1).amax(-1)
    kept_min = grouped.masked_fill(gmask, 10).amin(-1)
    assert torch.all(pruned_max <= kept_min)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 10), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16),
       per_row=st.booleans(), ties=st.booleans())
def test_unstructured_counts_are_exact_and_lowest(rows, cols, sparsity, seed, per_row, ties):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (rows, cols), generator=g).float() if ties else torch.rand(rows, cols, generator=g)
    mask = select_mask(scores, sparsity, Pattern(), per_row=per_row)
    if per_row:
        assert torch.all(mask.sum(1) == int(cols * sparsity))
        reference = torch.zeros_like(mask).scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, : int(cols * sparsity)], True)
    else:
        k = int(rows * cols * sparsity)
        assert int(mask.sum()) == k
        reference = torch.zeros(rows * cols, dtype=torch.bool)
        reference[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
        reference = reference.view(rows, cols)
    assert torch.equal(mask, reference)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), nm=patterns)
def test_pruning_is_idempotent(seed, nm):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 4 * m, generator=g)
    for pattern, sparsity in ((Pattern(n, m), 0.0), (Pattern(), 0.5)):
        once = W.masked_fill(select_mask(W.abs(), sparsity, pattern), 0)
        twice = once.masked_fill(select_mask(once.abs(), sparsity, pattern), 0)
        assert torch.equal(once, twice)


@pytest.mark.parametrize("text", ["5:4", "0:4", "2:x", "4:4", "2-4", "-1:4"])
def test_bad_patterns_are_refused(text):
    with pytest.raises(LlmpruneError, match="pattern"):
        parse_pattern(text)


def test_pattern_parsing_and_implied_sparsity():
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern("Unstructured") == Pattern()
    assert check_sparsity(None, Pattern(2, 4)) == 0.5
    assert check_sparsity(None, Pattern(4, 8)) == 0.5
    assert check_sparsity(None, Pattern(1, 4)) == 0.75
    with pytest.raises(LlmpruneError, match="implies 0.5"):
        check_sparsity(0.6, Pattern(2, 4))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(LlmpruneError, match=r"outside \[0, 1\)"):
            check_sparsity(bad, Pattern())


def test_nm_needs_divisible_width():
    with pytest.raises(LlmpruneError, match="multiple of 4"):
        select_mask(torch.rand(2, 6), 0.0, Pattern(2, 4))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 300), seed=st.integers(0, 10_000), ties=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_lowest_k_on_the_cpu_equals_the_torch_path(rows, cols, seed, ties, dtype):
    from llmprune.masks import _lowest_k_torch, lowest_k

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (rows, cols), generator=g).to(dtype) if ties else torch.randn(rows, cols, generator=g).to(dtype)
    k = int(torch.randint(1, cols + 1, (1,), generator=g))
    got = lowest_k(scores, k)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, _lowest_k_torch(scores, k))
    assert torch.equal(got.sum(1), torch.full((rows,), k))
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # the stable sort's choice, ties in column order
    assert torch.equal(got, torch.zeros_like(got).scatter_(1, order, True))


@pytest.mark.parametrize("values", ["normal", "ties", "zeros", "misleading sample"])
def test_kth_smallest_and_a_large_rows_mask_are_the_partitions(values):
    """kth_smallest brackets the k-th value from a strided sample on large vectors: it must give the exact k-th
    smallest at every k (float32 and float64), with ties, with most scores zero, and where the sample misleads (its
    fallback); lowest_k of one large row, which uses it, must be the torch path's mask."""
    import numpy as np

    from llmprune.masks import SAMPLE, SAMPLED_FROM, _lowest_k_torch, kth_smallest, lowest_k

    n = SAMPLED_FROM * 2 + 123
    rng = np.random.default_rng(5)
    scores = rng.standard_normal(n).astype(np.float32) ** 2
    if values == "ties":
        scores = rng.integers(0, 4, n).astype(np.float32)
    elif values == "zeros":
        scores[: int(0.8 * n)] = 0.0
    elif values == "misleading sample":
        scores[:: n // SAMPLE] = 1e6  # every sampled score is the largest: the bracket sits far above the k-th
    scratch, flags = np.empty(n, np.float32), np.empty(n, bool)
    for k in (1, 2, int(0.5 * n), int(0.7 * n), int(0.9 * n), n - 1, n):
        want = np.partition(scores, k - 1)[k - 1]
        assert kth_smallest(scores, k, scratch, flags) == want, k
        assert kth_smallest(scores.astype(np.float64), k) == want, k
    row = torch.from_numpy(scores).view(1, -1)
    for k in (int(0.5 * n), int(0.7 * n)):
        assert torch.equal(lowest_k(row, k), _lowest_k_torch(row, k))
