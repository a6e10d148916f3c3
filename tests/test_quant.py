"""quant.py: the integer grid, round-to-nearest, and GPTQ in SparseGPT's column loop (joint and with a fixed mask)."""
import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern
from llmprune.quant import QuantScheme, dequantize, parse_scheme, quantize, round_to_nearest, weight_qparams
from llmprune.solvers import make_solver

from test_solvers import layer_error, realistic_inputs

SCHEMES = [QuantScheme(4, 16, True), QuantScheme(4, 16, False), QuantScheme(8, 0, True), QuantScheme(8, 32, False),
           QuantScheme(4, 0, False)]


def sparsegpt_on(X, columns):
    solver = make_solver("sparsegpt", columns)
    for chunk in X.chunk(4):
        solver.add_batch(chunk)
    return solver


def test_the_grid_by_hand():
    """4-bit symmetric: scale = max|w| / 7.5, codes in [-8, 7] (+max|w| clips to 7, -max|w| rounds to -8);
    asymmetric: scale = (max - min) / 15, zero point = round(-8 - min / scale)."""
    W = torch.tensor([[-0.75, 0.5, 0.25, 0.8]])
    scale, zero = weight_qparams(W, QuantScheme(4, 0, True))
    assert scale.item() == pytest.approx(0.8 / 7.5) and zero.item() == 0
    assert quantize(W, scale, zero, QuantScheme(4, 0, True)).tolist() == [[-7, 5, 2, 7]]
    W = torch.tensor([[0.3, 1.5, 0.6, 0.9]])  # all positive: the range still spans 0
    scale, zero = weight_qparams(W, QuantScheme(4, 0, False))
    assert scale.item() == pytest.approx(0.1) and zero.item() == -8
    assert quantize(W, scale, zero, QuantScheme(4, 0, False)).tolist() == [[-5, 7, -2, 1]]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_and_exact_zeros(scheme):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 64, generator=g)
    W[W.abs() < 0.5] = 0
    W[3] = 0  # an all-zero row
    W_hat, scale, zero = round_to_nearest(W, scheme)
    codes = quantize(W_hat, scale, zero, scheme)
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    assert torch.equal(dequantize(codes, scale, zero), W_hat)  # ŵ is on the grid: requantizing moves nothing
    assert torch.equal(W_hat[W == 0], torch.zeros(int((W == 0).sum())))
    step = scale.repeat_interleave(scheme.group_size or 64, 1)
    assert ((W - W_hat).abs() <= step / 2 + 1e-6)[W_hat.abs() < 7 * step].all()  # round to nearest inside the range


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_gptq_beats_round_to_nearest_and_stays_on_the_grid(scheme):
    X = realistic_inputs(2048, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    q = sparsegpt_on(X, 64).quantize_many([W], [W == 0], scheme)[0]
    rtn = round_to_nearest(W, scheme)[0]
    assert layer_error(W, q.weight, X) < 0.8 * layer_error(W, rtn, X)
    assert q.codes.dtype == torch.int8 and q.scale.shape == (48, scheme.groups(64))
    assert torch.equal(dequantize(q.codes, q.scale, q.zero), q.weight)


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5)])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, True), QuantScheme(8, 0, False)], ids=str)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "alps", "magnitude"])
def test_gptq_after_any_solver_keeps_its_zeros_exactly(method, pattern, sparsity, scheme):
    X = realistic_inputs(2048, 64)
    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    solver = make_solver(method, 64)
    for chunk in X.chunk(4):
        solver.add_batch(chunk)
    pruned = solver.prune(W, sparsity, pattern)
    q = sparsegpt_on(X, 64).quantize_many([pruned], [pruned == 0], scheme)[0]
    assert torch.equal(q.weight == 0, pruned == 0) or bool(((pruned == 0) <= (q.weight == 0)).all())
    zero_codes = q.zero.repeat_interleave(scheme.group_size or 64, 1).to(torch.int8)
    assert torch.equal(q.codes[pruned == 0], zero_codes[pruned == 0])
    # GPTQ's objective: the pruned layer's outputs, better kept than by rounding the pruned weight to nearest
    bound = 0.8 if sparsity <= 0.5 else 0.9  # fewer kept weights left to take up the rounding error
    assert layer_error(pruned, q.weight, X) < bound * layer_error(pruned, round_to_nearest(pruned, scheme)[0], X)
    if scheme.bits == 8:
        assert layer_error(W, q.weight, X) < 1.02 * layer_error(W, pruned, X)  # 8 bits after pruning: nearly free


def test_stacked_weights_quantize_as_if_alone():
    X = realistic_inputs(1024, 64)
    g = torch.Generator().manual_seed(5)
    Wq, Wk = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)
    solver = sparsegpt_on(X, 64)
    scheme = QuantScheme(4, 16, False)
    together = solver.quantize_many([Wq, Wk], [Wq == 0, Wk == 0], scheme)
    alone = solver.quantize_many([Wk], [Wk == 0], scheme)[0]
    assert (together[1].weight - alone.weight).abs().max() < 1e-5
    assert together[0].scale.shape == (16, 4) and together[1].zero.shape == (8, 4)


def test_schemes_parse_and_explain_their_mistakes():
    assert parse_scheme("w4a16") == QuantScheme(4, 128, True)
    assert parse_scheme("W8A16", 0, False) == QuantScheme(8, 0, False)
    assert parse_scheme("none") is None
    for text, fragment in [("w3a16", "3 bits"), ("int4", "unknown scheme 'int4'")]:
        with pytest.raises(LlmpruneError, match=fragment):
            parse_scheme(text)
    with pytest.raises(LlmpruneError, match="not a multiple of the group size 128.*e.g. 96"):
        QuantScheme(4, 128).check("model.layers.0.mlp.down_proj", 576)
