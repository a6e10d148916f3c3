import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.allocation import outlier_ratio, owl, owl_blocks
from llmprune.errors import LlmpruneError


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 31.0]])]
    # mean = 40 / 10 = 4; above 5 × 4 = 20: one score of ten
    assert outlier_ratio(scores, m=5) == pytest.approx(0.1)
    assert outlier_ratio(scores, m=10) == 0.0


def test_more_outliers_lower_sparsity_and_the_papers_linear_map():
    s = owl([0.01, 0.02, 0.03], 0.7, lam=0.08)
    assert s[0] > s[1] > s[2]
    # symmetric ratios: OWL's map (spread 2λ, centred on the target) is used as is
    assert s == pytest.approx([0.78, 0.70, 0.62])


def test_skewed_ratios_are_shrunk_into_lambda():
    s = owl([0.0, 0.0, 0.0, 1.0], 0.6, lam=0.08)
    assert max(abs(v - 0.6) for v in s) == pytest.approx(0.08)
    assert sum(s) / 4 == pytest.approx(0.6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 0.2), min_size=1, max_size=40), st.floats(0.1, 0.85), st.floats(0, 0.09),
       st.data())
def test_owl_keeps_the_weighted_target_and_stays_within_lambda(ratios, target, lam, data):
    weights = data.draw(st.lists(st.floats(1, 1e6), min_size=len(ratios), max_size=len(ratios)))
    s = owl(ratios, target, lam=lam, weights=weights)
    mean = sum(v * w for v, w in zip(s, weights)) / sum(weights)
    assert mean == pytest.approx(target, abs=1e-9)
    assert all(abs(v - target) <= lam + 1e-12 for v in s)


def test_equal_ratios_give_the_target_everywhere():
    assert owl([0.05] * 4, 0.7) == [0.7] * 4


def test_a_lambda_that_leaves_zero_one_is_an_error():
    with pytest.raises(LlmpruneError, match="owl-lambda"):
        owl([0.0, 1.0], 0.95, lam=0.08)


def test_owl_blocks_leaves_blocks_without_targets_out_of_the_allocation():
    ratios, sizes = [0.02, 0.5, 0.01, 0.03], [100, 0, 300, 100]
    sparsities = owl_blocks(ratios, sizes, 0.7, lam=0.08)
    assert sparsities[1] == 0.0
    live = [0, 2, 3]
    assert sparsities[:1] + sparsities[2:] == owl([ratios[i] for i in live], 0.7, lam=0.08, weights=[sizes[i] for i in live])
    assert abs(sum(sparsities[i] * sizes[i] for i in live) / sum(sizes[i] for i in live) - 0.7) < 1e-12
