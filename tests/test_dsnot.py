import pytest
import torch

from llmprune.masks import Pattern, pattern_holds
from llmprune.solvers import make_solver
from llmprune.solvers.dsnot import DSnoTConfig, DSnoTStats, RefinedSolver, dsnot_mask, error_change, output_error


def llm_like_inputs(windows=8, seqlen=64, features=64, seed=0):
    """Windows of correlated activations with non-zero means and a few outlier features, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(features) + 0.3 * torch.randn(features, features, generator=g)
    X = torch.randn(windows, seqlen, features, generator=g) @ mix + torch.randn(features, generator=g)
    X[..., :4] *= 10.0
    return X  # [windows, seqlen, in]


def refined(method, W, X, sparsity, pattern, config=DSnoTConfig()):
    solver = RefinedSolver(make_solver(method, W.shape[1]), W.shape[1], torch.device("cpu"), config)
    for chunk in X.split(2):
        solver.add_batch(chunk)
    plain = make_solver(method, W.shape[1])
    for chunk in X.split(2):
        plain.add_batch(chunk)
    return solver.prune(W, sparsity, pattern), plain.prune(W, sparsity, pattern), solver


def true_error(W, W_hat, X):
    flat = X.reshape(-1, X.shape[-1]).double()
    return ((flat @ (W.double() - W_hat.double()).T) ** 2).sum(0)  # per row


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5)])
def test_refinement_never_raises_a_rows_error_and_keeps_the_sparsity(method, pattern, sparsity):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 64, generator=g)
    X = llm_like_inputs()
    W_r, W_s, solver = refined(method, W, X, sparsity, pattern)
    assert torch.all(true_error(W, W_r, X) <= true_error(W, W_s, X) * (1 + 1e-9))
    assert torch.equal((W_r == 0).sum(1), (W_s == 0).sum(1))  # swaps are one for one in every row
    assert pattern_holds(W_r, pattern)
    report = solver.reports[-1]
    assert report["error_after"] <= report["error_before"]
    kept = W_r != 0
    if method != "sparsegpt":  # Wanda and magnitude keep dense values; a regrown weight takes its dense value
        assert torch.equal(W_r[kept], W[kept])


def test_dsnot_improves_wanda_at_high_sparsity():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 64, generator=g)
    X = llm_like_inputs(seed=5)
    W_r, W_s, solver = refined("wanda", W, X, 0.7, Pattern())
    assert solver.reports[-1]["rows_refined"] > 0
    assert float(true_error(W, W_r, X).sum()) < float(true_error(W, W_s, X).sum())


def test_output_error_matches_the_direct_computation():
    g = torch.Generator().manual_seed(6)
    W, W_hat = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    X = llm_like_inputs(windows=2)
    stats = DSnoTStats(64, torch.device("cpu"))
    stats.add_batch(X)
    torch.testing.assert_close(output_error(W, W_hat, stats.H).double(), true_error(W, W_hat, X), rtol=1e-4, atol=1e-3)
    even, odd = stats.hessians()
    torch.testing.assert_close(output_error(W, W_hat, even).double(), true_error(W, W_hat, X[0:1]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(output_error(W, W_hat, odd).double(), true_error(W, W_hat, X[1:2]), rtol=1e-4, atol=1e-3)
    W_new = W_hat.clone()
    W_new[:, :5] = 0
    torch.testing.assert_close(error_change(W, W_hat, W_new, stats.H).double(),
                               true_error(W, W_new, X) - true_error(W, W_hat, X), rtol=1e-3, atol=1e-2)


def test_moments_match_the_direct_computation():
    X = llm_like_inputs(windows=5) * 3 + 0.5  # a mean well away from zero, where E[x²] − E[x]² loses digits
    stats = DSnoTStats(64, torch.device("cpu"))
    for chunk in X.split(2):
        stats.add_batch(chunk)
    X64 = X.double()
    torch.testing.assert_close(stats.window_mean().double(), X64.sum(1).mean(0).float().double(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats.variance().double(), X64.var(dim=1, unbiased=False).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.norms().double(), X64.square().sum((0, 1)).sqrt(), rtol=1e-6, atol=1e-6)
    assert stats.windows == 5 and stats.tokens == X.shape[0] * X.shape[1]


def test_borrowed_hessian_gives_the_same_halves():
    X = llm_like_inputs(windows=5)
    own = DSnoTStats(64, torch.device("cpu"))
    solver = make_solver("sparsegpt", 64)
    borrowed = DSnoTStats(64, torch.device("cpu"), hessian_from=solver)
    for chunk in X.split(2):
        own.add_batch(chunk)
        solver.add_batch(chunk)
        borrowed.add_batch(chunk)
    for a, b in zip(own.hessians(), borrowed.hessians()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-2)


def test_refinement_is_kept_only_where_both_halves_agree():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 64, generator=g)
    X = llm_like_inputs(windows=6, seed=8)
    W_r, W_s, solver = refined("wanda", W, X, 0.7, Pattern())
    changed = (W_r != W_s).any(1)
    assert changed.any()
    for half in (X[0::2], X[1::2]):
        assert torch.all(true_error(W, W_r, half)[changed] < true_error(W, W_s, half)[changed])


def test_hand_worked_swap():
    # one window of 4 tokens; per-feature means 2, 1.25, 1, -2 and variances 1, 1/16, 1, 1
    X = torch.tensor([[[1.0, 1.0, 0.0, -1.0], [3.0, 1.5, 2.0, -3.0], [1.0, 1.0, 0.0, -1.0], [3.0, 1.5, 2.0, -3.0]]])
    stats = DSnoTStats(4, torch.device("cpu"))
    stats.add_batch(X)
    W = torch.tensor([[1.0, 1.0, -0.5, 0.25]])
    mask = torch.tensor([[True, True, False, False]])
    # window shifts W·Σx: 8, 5, -2, -2, so ε = 13. Regrow the best shift/variance: 5 / (1/16) = 80 beats 8 / 1.
    # Prune the kept weight of opposite shift with the lowest |W|·‖x‖: 0.25·√20 = 1.12 < 0.5·√8 = 1.41.
    one = dsnot_mask(W, mask, stats, Pattern(), DSnoTConfig(cycles=1))
    assert one.tolist() == [[True, False, False, True]]
    # ε = 13 - 5 - 2 = 6; the next swap (regrow 8, prune -2) gives -4: the sign flips, so the row stops there
    assert torch.equal(dsnot_mask(W, mask, stats, Pattern(), DSnoTConfig()), one)


def test_sign_constraint_stops_a_row_that_would_overshoot():
    X = torch.ones(1, 4, 2)  # mean 1 on both inputs
    X[0, :, 1] = torch.tensor([0.0, 2.0, 0.0, 2.0])
    stats = DSnoTStats(2, torch.device("cpu"))
    stats.add_batch(X)
    W = torch.tensor([[1.0, -5.0]])
    mask = torch.tensor([[True, False]])  # ε = 4 × 1.0 = 4 > 0; the only swap prunes -5 (ε → 4 - 4 - 20 < 0)
    same = dsnot_mask(W, mask, stats, Pattern(), DSnoTConfig(same_sign=True))
    assert torch.equal(same, mask)
    free = dsnot_mask(W, mask, stats, Pattern(), DSnoTConfig(same_sign=False))
    assert free.tolist() == [[False, True]]
