import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern, pattern_holds
from llmprune.solvers import SOLVERS, make_solver
from llmprune.solvers.sparsegpt import SparseGPTSolver


def realistic_inputs(tokens=2048, features=64, seed=0):
    """Correlated activations with a few outlier features, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, features, generator=g) @ (torch.eye(features) + 0.3 * torch.randn(features, features, generator=g))
    X[:, :4] *= 12.0
    return X


def solve(method, W, X, sparsity, pattern, batches=4):
    solver = make_solver(method, W.shape[1])
    for chunk in X.chunk(batches):
        solver.add_batch(chunk)
    return solver.prune(W, sparsity, pattern)


def recon_error(W, W_hat, X):
    return float(torch.linalg.norm(X @ W.T - X @ W_hat.T))


def test_wanda_hand_worked_example():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    X = torch.diag(torch.tensor([4.0, 1.0, 0.1, 2.0]))  # input norms 4, 1, 0.1, 2 -> scores 4, 2, 0.3, 1
    assert torch.equal(solve("wanda", W, X, 0.5, Pattern(), batches=2), torch.tensor([[1.0, -2.0, 0.0, 0.0]]))


def test_wanda_matches_brute_force_ranking():
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(16, 32, generator=g), realistic_inputs(256, 32)
    out = solve("wanda", W, X, 0.375, Pattern())
    norms = torch.sqrt((X.double() ** 2).sum(0))
    for i in range(W.shape[0]):
        scores = [(abs(W[i, j].item()) * norms[j].item(), j) for j in range(W.shape[1])]
        pruned = {j for _, j in sorted(scores)[:12]}
        assert {j for j in range(32) if out[i, j] == 0} == pruned
        kept = [j for j in range(32) if j not in pruned]
        assert torch.equal(out[i, kept], W[i, kept])


def test_wanda_nm_prunes_within_each_group():
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(8, 32, generator=g), realistic_inputs(128, 32)
    out = solve("wanda", W, X, 0.5, Pattern(2, 4))
    assert pattern_holds(out, Pattern(2, 4))
    scores = W.abs() * torch.sqrt((X ** 2).sum(0))
    kept = (out != 0).reshape(8, 8, 4)
    grouped = scores.reshape(8, 8, 4)
    assert torch.all(grouped.masked_fill(~kept, float("inf")).amin(-1) >= grouped.masked_fill(kept, -1).amax(-1))


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5), (Pattern(), 0.7)])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern, sparsity):
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(96, 64, generator=g), realistic_inputs()
    errors = {m: recon_error(W, solve(m, W, X, sparsity, pattern), X) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("method", list(SOLVERS))
@pytest.mark.parametrize("pattern,sparsity,zeros", [(Pattern(), 0.5, 96 * 32), (Pattern(2, 4), 0.5, 96 * 32),
                                                   (Pattern(4, 8), 0.5, 96 * 32), (Pattern(1, 4), 0.75, 96 * 48)])
def test_exact_sparsity_and_pattern(method, pattern, sparsity, zeros):
    g = torch.Generator().manual_seed(4)
    W, X = torch.randn(96, 64, generator=g), realistic_inputs()
    before = W.clone()
    out = solve(method, W, X, sparsity, pattern)
    assert torch.equal(W, before), "prune must not touch its input"
    assert out.shape == W.shape and out.dtype == W.dtype
    assert int((out == 0).sum()) == zeros
    assert pattern_holds(out, pattern)


@pytest.mark.parametrize("method", list(SOLVERS))
def test_sparsity_zero_returns_w(method):
    g = torch.Generator().manual_seed(5)
    W, X = torch.randn(8, 16, generator=g), realistic_inputs(64, 16)
    assert torch.equal(solve(method, W, X, 0.0, Pattern()), W)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_their_dtype(dtype):
    g = torch.Generator().manual_seed(6)
    W, X = torch.randn(32, 64, generator=g).to(dtype), realistic_inputs().to(dtype)
    out = solve("sparsegpt", W, X, 0.5, Pattern(2, 4))
    assert out.dtype == dtype and pattern_holds(out, Pattern(2, 4))
    assert torch.isfinite(out.float()).all()


def test_sparsegpt_update_is_least_squares_optimal():
    """Pruning only the first column, the OBS update of the rest is the least-squares fit (no dampening)."""
    g = torch.Generator().manual_seed(7)
    X = realistic_inputs(512, 8).double().float()
    W = torch.randn(1, 8, generator=g)
    W[0, 0] = 1e-3  # the lowest score: the one weight pruned at sparsity 1/8
    solver = SparseGPTSolver(8, torch.device("cpu"), percdamp=1e-9)
    solver.add_batch(X)
    out = solver.prune(W, 1 / 8, Pattern())
    assert out[0, 0] == 0
    target = (X.double() @ W.double().T).squeeze(1)
    best = torch.linalg.lstsq(X[:, 1:].double(), target).solution
    torch.testing.assert_close(out[0, 1:].double(), best, rtol=1e-3, atol=1e-4)


def test_dead_inputs_are_pruned_and_harmless():
    g = torch.Generator().manual_seed(8)
    X = realistic_inputs(256, 16)
    X[:, 3] = 0
    W = torch.randn(4, 16, generator=g)
    out = solve("sparsegpt", W, X, 0.5, Pattern())
    assert torch.all(out[:, 3] == 0) and torch.isfinite(out).all()


def test_shared_solver_gives_the_same_result_as_separate_ones():
    g = torch.Generator().manual_seed(9)
    X = realistic_inputs(256, 32)
    Wq, Wk = torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)
    shared = make_solver("sparsegpt", 32)
    shared.add_batch(X)
    together = (shared.prune(Wq, 0.5, Pattern()), shared.prune(Wk, 0.5, Pattern()))
    apart = (solve("sparsegpt", Wq, X, 0.5, Pattern(), 1), solve("sparsegpt", Wk, X, 0.5, Pattern(), 1))
    assert all(torch.equal(a, b) for a, b in zip(together, apart))


def test_unknown_method():
    with pytest.raises(LlmpruneError, match="unknown method 'obs'.*sparsegpt"):
        make_solver("obs", 4)


@pytest.mark.parametrize("pattern,sparsities", [(Pattern(), (0.5, 0.3, 0.7)), (Pattern(2, 4), (0.5, 0.5, 0.5))])
def test_sparsegpt_prune_many_equals_one_at_a_time(pattern, sparsities):
    """Stacking the rows of weights that share an input changes nothing: masks are chosen per weight."""
    g = torch.Generator().manual_seed(10)
    X = realistic_inputs(512, 32)
    weights = [torch.randn(rows, 32, generator=g) for rows in (8, 4, 6)]
    solver = make_solver("sparsegpt", 32)
    solver.add_batch(X)
    together = solver.prune_many(weights, list(sparsities), pattern)
    for W, s, T in zip(weights, sparsities, together):
        alone = solver.prune(W, s, pattern)
        assert torch.equal(alone == 0, T == 0)
        torch.testing.assert_close(alone, T, rtol=1e-5, atol=1e-5)  # GEMM blocking may reorder sums
        assert int((T == 0).sum()) == (W.numel() // 2 if pattern.structured else round(s * W.numel()))


@pytest.mark.parametrize("n", [300, 1000, 1536])
def test_inverse_cholesky_matches_a_float64_factorization(n):
    from llmprune.solvers.sparsegpt import inverse_cholesky

    g = torch.Generator().manual_seed(n)
    X = torch.randn(4 * n, n, generator=g) * torch.rand(n, generator=g) * 3  # uneven scales, as activations have
    M = X.T @ X / X.shape[0]
    M.diagonal().add_(0.01 * M.diagonal().mean())
    expected = torch.linalg.inv(torch.linalg.cholesky(M.double()))
    got = inverse_cholesky(M)
    assert torch.equal(got, torch.tril(got))
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("n", [70, 300])
def test_exact_hessian_sums_each_batch_in_fp64_on_the_upper_blocks(n):
    """add_upper_exact_ writes only the upper block triangle of its reused fp32 buffer (never clearing it): H must be
    each batch's own fp32 block products summed in fp64, bit for bit, below the blocks exactly zero."""
    from llmprune.solvers.sparsegpt import add_upper_exact_

    g = torch.Generator().manual_seed(n)
    step = 64
    H, expected, batch = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64), None
    for tokens in (33, 128, 7):
        x = torch.randn(tokens, n, generator=g) * 3
        batch = add_upper_exact_(H, batch, x, step)
        for i in range(0, n, step):  # this batch alone, in fp32, block by block as the solver multiplies it
            expected[i : i + step, i:] += (x[:, i : i + step].T @ x[:, i:]).double()
    assert torch.equal(H, expected)
    for i in range(0, n, step):
        assert not H[i + step :, i : i + step].any()


# ALPS (solvers/alps.py)

def layer_error(W, W_hat, X):
    """‖(W − Ŵ)Xᵀ‖², the layer's output error on the calibration inputs."""
    return float(((W.double() - W_hat.double()) @ X.double().T).square().sum())


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(), 0.9), (Pattern(2, 4), 0.5),
                                              (Pattern(4, 8), 0.5)])
def test_alps_beats_sparsegpt_on_correlated_inputs(pattern, sparsity):
    g = torch.Generator().manual_seed(11)
    W, X = torch.randn(96, 64, generator=g), realistic_inputs()
    alps, sparsegpt = (layer_error(W, solve(m, W, X, sparsity, pattern), X) for m in ("alps", "sparsegpt"))
    assert alps < 0.9 * sparsegpt, (alps, sparsegpt)


@pytest.mark.parametrize("values", ["normal", "ties", "zeros"])
def test_alps_layer_projection_is_lowest_ks_mask_call_after_call(values):
    """The layer budget's projection keeps buffers between calls: each call's mask must be lowest_k's of Z² (ties
    pruned in index order), and a mask already returned must not change when the next call runs."""
    from llmprune.masks import lowest_k
    from llmprune.solvers.alps import _projector

    g = torch.Generator().manual_seed(3)
    keep = _projector((96, 40), 0.7, Pattern(), "layer")
    masks, expected = [], []
    for step in range(4):
        Z = torch.randn(96, 40, generator=g)
        if values == "ties":
            Z = torch.randint(-2, 3, (96, 40), generator=g).float()  # few values: ties straddle the cut
        elif values == "zeros":
            Z[: 60 + 10 * step] = 0.0
        masks.append(keep(Z))
        expected.append((~lowest_k(Z.square().view(1, -1), int(96 * 40 * 0.7))).view(96, 40).float())
    for got, want in zip(masks, expected):
        assert torch.equal(got, want)
        assert int((got == 0).sum()) == int(96 * 40 * 0.7)


def test_alps_budget_is_per_layer_and_exact():
    g = torch.Generator().manual_seed(12)
    W, X = torch.randn(40, 48, generator=g), realistic_inputs(512, 48)
    out = solve("alps", W, X, 0.7, Pattern())
    assert int((out == 0).sum()) == int(0.7 * 40 * 48)
    per_row = (out == 0).sum(1)
    assert per_row.min() < per_row.max()  # the budget is the layer's, not each row's


def test_alps_row_budget_prunes_every_row_alike_and_still_beats_sparsegpt():
    from llmprune.solvers.alps import ALPSSolver

    g = torch.Generator().manual_seed(12)
    W, X = torch.randn(40, 48, generator=g), realistic_inputs(512, 48)
    solver = ALPSSolver(48, torch.device("cpu"), budget="row")
    solver.add_batch(X)
    out = solver.prune(W, 0.7, Pattern())
    assert ((out == 0).sum(1) == int(0.7 * 48)).all()
    layer = solve("alps", W, X, 0.7, Pattern())
    assert not torch.equal(out != 0, layer != 0)
    assert layer_error(W, out, X) < 0.9 * layer_error(W, solve("sparsegpt", W, X, 0.7, Pattern()), X)
    with pytest.raises(ValueError, match="budget"):
        ALPSSolver(48, torch.device("cpu"), budget="block")


def test_alps_refit_is_the_least_squares_optimum_on_its_support():
    """After ADMM, the kept weights minimise ‖X(Ŵ − W)‖² + λ‖Ŵ − W‖²_D on the support: checked against a direct
    solve of each row's normal equations (λ·diag(H) is the dampening, in the solver's coordinates)."""
    from llmprune.solvers.alps import ALPSSolver

    g = torch.Generator().manual_seed(13)
    X = realistic_inputs(512, 12)
    W = torch.randn(6, 12, generator=g)
    solver = ALPSSolver(12, torch.device("cpu"), refit_iters=50, refit_rtol=1e-7)
    solver.add_batch(X)
    out = solver.prune(W, 0.5, Pattern())
    H = (X.double().T @ X.double())
    H += solver.percdamp * torch.diagonal(H).mean() * torch.eye(12, dtype=torch.float64)
    for i in range(6):
        keep = out[i] != 0
        # minimise (w − W)ᵀ H (w − W) over w with w = 0 off the support: H_SS w_S = (H W)_S
        best = torch.linalg.solve(H[keep][:, keep], (H @ W[i].double())[keep])
        torch.testing.assert_close(out[i, keep].double(), best, rtol=1e-4, atol=1e-5)


def test_alps_is_deterministic_and_keeps_its_input():
    g = torch.Generator().manual_seed(14)
    W, X = torch.randn(32, 64, generator=g), realistic_inputs()
    before = W.clone()
    first, second = solve("alps", W, X, 0.6, Pattern()), solve("alps", W, X, 0.6, Pattern())
    assert torch.equal(first, second) and torch.equal(W, before)


def test_alps_shares_one_eigendecomposition_between_linears():
    g = torch.Generator().manual_seed(15)
    X = realistic_inputs(256, 32)
    Wq, Wk = torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)
    shared = make_solver("alps", 32)
    shared.add_batch(X)
    q = shared.prune(Wq, 0.5, Pattern())
    basis = shared._basis
    k = shared.prune(Wk, 0.5, Pattern())
    assert shared._basis is basis
    assert torch.equal(q, solve("alps", Wq, X, 0.5, Pattern(), 1)) and torch.equal(k, solve("alps", Wk, X, 0.5, Pattern(), 1))


def test_alps_without_data_is_magnitude_like_and_finite():
    g = torch.Generator().manual_seed(16)
    W = torch.randn(8, 16, generator=g)
    solver = make_solver("alps", 16)
    out = solver.prune(W, 0.5, Pattern(2, 4))
    assert torch.isfinite(out).all() and pattern_holds(out, Pattern(2, 4))
    assert torch.equal(out != 0, solve("magnitude", W, torch.zeros(0, 16), 0.5, Pattern(2, 4)) != 0)



def test_alps_layer_projection_on_a_large_layer_is_lowest_ks_mask():
    """A layer of more scores than masks.SAMPLED_FROM takes the bracketed k-th value: the same mask as lowest_k's."""
    from llmprune.masks import SAMPLED_FROM, lowest_k
    from llmprune.solvers.alps import _projector

    g = torch.Generator().manual_seed(4)
    keep = _projector((640, 200), 0.7, Pattern(), "layer")
    assert 640 * 200 >= SAMPLED_FROM
    for Z in (torch.randn(640, 200, generator=g), torch.randint(-2, 3, (640, 200), generator=g).float()):
        want = (~lowest_k(Z.square().view(1, -1), int(0.7 * Z.numel()))).view(640, 200).float()
        assert torch.equal(keep(Z), want)


# ADMM with a gradual mask (solvers/admm.py)

@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_admm_beats_sparsegpt_unstructured_on_correlated_inputs(sparsity):
    g = torch.Generator().manual_seed(11)
    W, X = torch.randn(96, 64, generator=g), realistic_inputs()
    admm, sparsegpt = (layer_error(W, solve(m, W, X, sparsity, Pattern()), X) for m in ("admm", "sparsegpt"))
    assert admm < 0.9 * sparsegpt, (admm, sparsegpt)


def reference_admm(W, X, sparsity, iters=20, gradual=15, damp=0.1, rho=1.0):
    """The iteration written out plainly in float64 (Boža 2024): the layer budget, the cubic schedule, the last
    projection as the result."""
    H = X.double().T @ X.double()
    d = torch.diagonal(H).sqrt()
    Hn = H / d.unsqueeze(1) / d.unsqueeze(0) + damp * torch.eye(len(d), dtype=torch.float64)
    B0 = (W.double() * d).T
    G, inverse = Hn @ B0, torch.linalg.inv(Hn + rho * torch.eye(len(d), dtype=torch.float64))
    B, U = B0.clone(), torch.zeros_like(B0)
    for t in range(1, iters + 1):
        if t <= gradual:
            share = sparsity * (1 - (1 - t / gradual) ** 3)
            Z = (B + U).flatten()
            mask = torch.ones_like(Z)
            mask[torch.topk(Z.abs(), int(share * Z.numel()), largest=False).indices] = 0
            mask = mask.view(B.shape)
        D = (B + U) * mask
        U = U + B - D
        B = inverse @ (G + rho * (D - U))
    return ((B + U) * mask / d.unsqueeze(1)).T


def test_admm_is_the_plain_iteration():
    g = torch.Generator().manual_seed(17)
    X = realistic_inputs(512, 24)
    W = torch.randn(10, 24, generator=g)
    out = solve("admm", W, X, 0.6, Pattern(), 1)
    want = reference_admm(W, X, 0.6)
    assert torch.equal(out == 0, want == 0)
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-4)
    assert int((out == 0).sum()) == int(0.6 * 240)


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.7), (Pattern(2, 4), 0.5), (Pattern(1, 4), 0.75)])
def test_admm_schedule_rises_to_the_budget_and_keeps_each_groups_largest(pattern, sparsity):
    from llmprune.masks import prune_count
    from llmprune.solvers.admm import _Gradual
    from llmprune.solvers.alps import _projector

    g = torch.Generator().manual_seed(18)
    project = _Gradual((64, 24), sparsity, pattern, "layer", 15)
    shares = [project.share(t) for t in range(1, 21)]
    assert all(a < b for a, b in zip(shares[:14], shares[1:15])) and shares[14:] == [pytest.approx(sparsity)] * 6
    assert 0 < shares[0] < 0.25 * sparsity
    for t in (1, 5, 14, 15, 20):
        Z = torch.randn(64, 24, generator=g)
        mask = project(Z, t)
        assert int((mask == 0).sum()) == prune_count(64 * 24, shares[t - 1]), t
        if pattern.structured:  # the groups' n largest are kept throughout; the pattern itself from t = gradual
            top = _projector((64, 24), sparsity, pattern)(Z)
            assert bool((mask >= top).all()), t
            if t >= 15:
                assert torch.equal(mask, top)


def test_admm_refit_option_is_the_least_squares_optimum_on_its_support():
    """With the refit, the kept weights minimise (w − W)ᵀ(H + δ·diag H)(w − W) on the support (Ĥ = D⁻¹HD⁻¹ + δI in
    the solver's coordinates)."""
    from llmprune.solvers.admm import ADMMSolver

    g = torch.Generator().manual_seed(19)
    X = realistic_inputs(512, 12)
    W = torch.randn(6, 12, generator=g)
    solver = ADMMSolver(12, torch.device("cpu"), refit_iters=50, refit_rtol=1e-7)
    solver.add_batch(X)
    out = solver.prune(W, 0.5, Pattern())
    H = X.double().T @ X.double()
    H += solver.damp * torch.diag(torch.diagonal(H))
    for i in range(6):
        keep = out[i] != 0
        best = torch.linalg.solve(H[keep][:, keep], (H @ W[i].double())[keep])
        torch.testing.assert_close(out[i, keep].double(), best, rtol=1e-4, atol=1e-5)
    plain = make_solver("admm", 12)
    plain.add_batch(X)
    assert layer_error(W, out, X) <= layer_error(W, plain.prune(W, 0.5, Pattern()), X) * (1 + 1e-6)


def test_admm_is_deterministic_shares_its_inverse_and_checks_its_options():
    from llmprune.solvers.admm import ADMMSolver

    g = torch.Generator().manual_seed(20)
    X = realistic_inputs(256, 32)
    Wq, Wk = torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)
    shared = make_solver("admm", 32)
    shared.add_batch(X)
    before = Wq.clone()
    q = shared.prune(Wq, 0.5, Pattern())
    basis = shared._basis
    k = shared.prune(Wk, 0.5, Pattern(2, 4))
    assert shared._basis is basis and torch.equal(Wq, before)
    assert torch.equal(q, solve("admm", Wq, X, 0.5, Pattern(), 1)) and torch.equal(k, solve("admm", Wk, X, 0.5, Pattern(2, 4), 1))
    row = ADMMSolver(32, torch.device("cpu"), budget="row")
    row.add_batch(X)
    assert ((row.prune(Wq, 0.5, Pattern()) == 0).sum(1) == 16).all()
    with pytest.raises(ValueError, match="gradual"):
        ADMMSolver(32, torch.device("cpu"), iters=10, gradual=12)
    no_data = make_solver("admm", 16).prune(Wq[:, :16], 0.5, Pattern(2, 4))
    assert torch.equal(no_data != 0, solve("magnitude", Wq[:, :16], torch.zeros(0, 16), 0.5, Pattern(2, 4)) != 0)
