"""quant.py: the integer grid, round-to-nearest, and GPTQ in SparseGPT's column loop (joint and with a fixed mask)."""
import pytest
import torch

from llmprune.recipe import AUTO_PASSES

from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern
from llmprune.quant import QuantScheme, dequantize, parse_scheme, quantize, round_to_nearest, weight_qparams
from llmprune.solvers import make_solver

from test_solvers import layer_error, realistic_inputs

SCHEMES = [QuantScheme(4, 16, True), QuantScheme(4, 16, False), QuantScheme(8, 0, True), QuantScheme(8, 32, False),
           QuantScheme(4, 0, False), QuantScheme(4, 16, True, observer="mse"), QuantScheme(4, 16, False, observer="mse")]


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
@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, True), QuantScheme(8, 0, False),
                                    QuantScheme(4, 16, False, observer="mse")], ids=str)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "alps", "admm", "magnitude"])
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


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_mse_observer_picks_each_rows_best_factor_in_every_group_at_once(symmetric):
    """Static groups ([groups, g, rows], as choose_all passes them): every row of every group gets the factor of
    SHRINKS with the least weighted error, found here by brute force, and the batched call equals one call a group."""
    from llmprune.quant import SHRINKS, clipped_qparams, qparams

    gen = torch.Generator().manual_seed(11)
    blocks = torch.randn(3, 16, 24, generator=gen) * (1 + 5 * (torch.rand(3, 16, 24, generator=gen) < 0.05))
    importance = torch.rand(3, 16, generator=gen) + 0.1
    scheme = QuantScheme(4, 16, symmetric, observer="mse")
    s, z = clipped_qparams(blocks, importance, scheme)
    assert s.shape == z.shape == (3, 24)
    errors = []
    for shrink in SHRINKS:
        ss, zz = qparams(blocks.amin(1) * shrink, blocks.amax(1) * shrink, scheme)
        q = (torch.round(blocks / ss[:, None]) + zz[:, None]).clamp(scheme.qmin, scheme.qmax)
        errors.append((((q - zz[:, None]) * ss[:, None] - blocks).square() * importance[..., None]).sum(1))
    errors = torch.stack(errors)  # [factors, groups, rows]
    q = (torch.round(blocks / s[:, None]) + z[:, None]).clamp(scheme.qmin, scheme.qmax)
    chosen = (((q - z[:, None]) * s[:, None] - blocks).square() * importance[..., None]).sum(1)
    assert torch.allclose(chosen, errors.amin(0), rtol=1e-5, atol=1e-9)
    assert (errors.argmin(0) > 0).any()  # some rows do shrink: the test can tell a search from the full range
    for k in range(3):
        sk, zk = clipped_qparams(blocks[k], importance[k], scheme)
        assert torch.equal(sk, s[k]) and torch.equal(zk, z[k])


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_mse_observer_never_rounds_a_group_worse_and_helps_gptq_after_2of4(symmetric):
    from llmprune.quant import clipped_qparams, qparams

    g = torch.Generator().manual_seed(6)
    block = torch.randn(16, 40, generator=g) * (1 + 6 * (torch.rand(16, 40, generator=g) < 0.03))  # a few outliers
    block[block.abs() < 0.3] = 0  # pruned
    importance = torch.rand(16, generator=g) + 0.1
    scheme = QuantScheme(4, 16, symmetric, observer="mse")

    def error(s, z):
        q = (torch.round(block / s) + z).clamp(scheme.qmin, scheme.qmax)
        return (((q - z) * s - block).square() * importance[:, None]).sum(0), (q - z) * s

    clipped, rounded = error(*clipped_qparams(block, importance, scheme))
    plain, _ = error(*qparams(block.amin(0), block.amax(0), scheme))
    assert (clipped <= plain + 1e-6).all() and (clipped < 0.95 * plain).any()  # the full range is one of the choices
    assert torch.equal(rounded[block == 0], torch.zeros(int((block == 0).sum())))  # a pruned 0 stays exact
    X = realistic_inputs(2048, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(7))
    solver = sparsegpt_on(X, 64)
    pruned = solver.prune(W, 0.5, Pattern(2, 4))
    errors = {obs: layer_error(pruned, solver.quantize_many([pruned], [pruned == 0],
                                                               QuantScheme(4, 16, symmetric, observer=obs))[0].weight, X)
              for obs in ("minmax", "mse")}
    assert errors["mse"] < 0.9 * errors["minmax"]
    with pytest.raises(LlmpruneError, match="observer: unknown value 'max'; choose one of minmax, mse"):
        QuantScheme(observer="max")


@pytest.mark.parametrize("method,own", [("sparsegpt", True), ("alps", True), ("wanda", False), ("magnitude", False)])
def test_gptq_rounds_with_the_solvers_own_hessian_where_it_has_one(method, own):
    """SparseGPT and ALPS gather one fp64-summed Hessian for the solve and the rounding; Wanda and magnitude get a
    rounder beside them (before, SparseGPT gathered a second Hessian: half of GPTQ's statistics time)."""
    from llmprune.calibrate.pruner import BlockPruner

    lin = torch.nn.Linear(32, 8, bias=False)
    pruner = BlockPruner({"l": lin}, method, lambda name: 0.5, Pattern(), "cpu", quantize=QuantScheme(4, 16, True))
    x = torch.randn(64, 32)
    pruner.observe("l", x)
    solver = pruner.groups["l"][0]
    assert (solver.gptq() is not None) == own and (id(solver) in pruner._rounders) != own
    rounder = pruner._rounder(solver)
    assert rounder.tokens == 64 and (rounder.H.dtype == torch.float64) == (method != "alps")  # ALPS hands its fp64 sum as fp32
    assert torch.allclose(rounder.hessian.triu(), (x.T @ x).triu(), atol=1e-4)


def test_schemes_parse_and_explain_their_mistakes():
    assert parse_scheme("w4a16") == QuantScheme(4, 128, True)
    assert parse_scheme("W8A16", 0, False) == QuantScheme(8, 0, False)
    assert parse_scheme("none") is None
    for text, fragment in [("w3a16", "3 bits"), ("int4", "unknown scheme 'int4'")]:
        with pytest.raises(LlmpruneError, match=fragment):
            parse_scheme(text)
    with pytest.raises(LlmpruneError, match="not a multiple of the group size 128.*--group-size 96, which divides"):
        QuantScheme(4, 128).check("model.layers.0.mlp.down_proj", 576)


# ---- in the pruning loop, end to end ----------------------------------------------------------------------------

import json  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

import llmprune  # noqa: E402
from llmprune import api  # noqa: E402
from llmprune.cli.app import app  # noqa: E402
from llmprune.masks import pattern_holds  # noqa: E402
from llmprune.recipe import load_recipe  # noqa: E402

runner = CliRunner()


def prune_cli(source, text_file, out, *extra):
    return runner.invoke(app, [str(a) for a in ("prune", source, "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
                                                "--out", out, "--device", "cpu", "--json", *extra)])


def linears_of(directory):
    model, _ = llmprune.load(str(directory))
    return {n: m.weight.detach() for n, m in model.named_modules() if n.endswith("proj") or n.endswith("fc1")
            or n.endswith("fc2") or n.endswith("dense")}


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "alps", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_solver_and_pattern_keeps_its_zeros_through_gptq(tiny_model_dir, text_file, tmp_path, method, pattern):
    """The first linears of block 0 see the same inputs with and without --quantize, so their masks are the same:
    quantized, every pruned weight is still zero (rounding may add zeros, never remove one), and N:M holds."""
    source = tiny_model_dir("llama")
    plain = prune_cli(source, text_file, tmp_path / "plain", "--method", method, "--pattern", pattern)
    quantized = prune_cli(source, text_file, tmp_path / "q", "--method", method, "--pattern", pattern,
                          "--quantize", "w4a16", "--group-size", "32")
    assert plain.exit_code == 0 and quantized.exit_code == 0, quantized.output
    report = json.loads(quantized.stdout)
    assert report["format"] == "pack-quantized" and report["sizes"]["linear_stored_bytes"] < 0.2 * report["sizes"]["linear_dense_bytes"]
    assert all(r["quantized"] == f"w4a16 g32 symmetric mse descent {AUTO_PASSES}" for r in report["linears"])
    before, after = linears_of(tmp_path / "plain"), linears_of(tmp_path / "q")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        assert bool(((before[name] == 0) <= (after[name] == 0)).all()), name
    for name, W in after.items():
        if pattern == "2:4":
            assert pattern_holds(W, Pattern(2, 4)), name
        else:
            assert (W == 0).float().mean() >= 0.5, name


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "opt", "phi"])
def test_quantized_on_every_architecture(tiny_model_dir, text_file, tmp_path, arch):
    result = prune_cli(tiny_model_dir(arch), text_file, tmp_path / "q", "--pattern", "2:4", "--quantize", "w8a16",
                       "--group-size", "0", "--asymmetric")
    assert result.exit_code == 0, result.output
    model, _ = llmprune.load(str(tmp_path / "q"))
    quantized = [r["name"] for r in json.loads(result.stdout)["linears"] if r["quantized"]]
    modules = dict(model.named_modules())
    assert quantized and all(pattern_holds(modules[n].weight, Pattern(2, 4)) for n in quantized)


def test_conv1d_and_bad_group_sizes_are_one_line_errors(tiny_model_dir, text_file, tmp_path):
    result = prune_cli(tiny_model_dir("gpt2"), text_file, tmp_path / "g", "--quantize", "w4a16", "--group-size", "32")
    assert result.exit_code == 2 and "Conv1D, not an nn.Linear" in result.stderr and not (tmp_path / "g").exists()
    result = prune_cli(tiny_model_dir("llama"), text_file, tmp_path / "l", "--quantize", "w4a16")  # 64 inputs, group 128
    assert result.exit_code == 2 and "not a multiple of the group size 128" in result.stderr, result.output
    assert "--group-size 64" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "l").exists()
    result = prune_cli(tiny_model_dir("llama"), text_file, tmp_path / "l", "--quantize", "w3a16")
    assert result.exit_code == 2 and "w3a16" in result.stderr


def test_owl_dsnot_and_resume_with_quantization(tmp_path, text_file, monkeypatch):
    from test_streaming import CALIB, assert_same, interrupt_after, sharded_model

    model = str(sharded_model(tmp_path / "m"))
    fields = dict(method="wanda", sparsity=0.6, allocation="owl", refine="dsnot", quantize="w4a16", group_size=16,
                  symmetric=False, **{**CALIB, "calibration": str(text_file)})
    _, whole = api.prune(model, out=tmp_path / "whole", **fields)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(LlmpruneError, match="continue with --resume"):
            api.prune(model, out=tmp_path / "out", **fields)
    _, report = api.prune(model, out=tmp_path / "out", resume=True, **fields)
    assert report["resumed_after_block"] == 2 and report["format"] == "pack-quantized"
    assert_same(tmp_path / "whole", tmp_path / "out")
    assert any(r["refine"] for r in whole["linears"]) and whole["allocation"]["block_sparsity"]


def test_gptq_alone_at_sparsity_zero(tiny_model_dir, text_file, tmp_path):
    result = prune_cli(tiny_model_dir("llama"), text_file, tmp_path / "q", "--sparsity", "0", "--quantize", "w8a16",
                       "--group-size", "0")
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(tmp_path / "q"), "--json"])
    data = json.loads(info.stdout)
    assert data["quantization"]["scheme"] == "w8a16 per channel symmetric"
    assert 8 < data["quantization"]["bits_per_weight"] < 8.6 and data["quantization"]["sparsity_kept"] < 0.05
    result = prune_cli(tiny_model_dir("llama"), text_file, tmp_path / "mse", "--sparsity", "0", "--quantize", "w4a16",
                       "--group-size", "16", "--observer", "mse")
    assert result.exit_code == 0, result.output
    assert {r["quantized"] for r in json.loads(result.stdout)["linears"]} == {"w4a16 g16 symmetric actorder mse"}
    assert load_recipe(tmp_path / "mse" / "recipe.yaml").observer == "mse"


@pytest.mark.parametrize("fmt", ["compressed", "dense"])
def test_streamed_quantized_run_equals_in_memory(tmp_path, text_file, fmt):
    from test_streaming import CALIB, sharded_model, tensors

    model = str(sharded_model(tmp_path / "m"))
    fields = dict(method="sparsegpt", pattern="2:4", quantize="w4a16", group_size=32, format=fmt,
                  **{**CALIB, "calibration": str(text_file)})
    api.prune(model, out=tmp_path / "memory", stream=False, **fields)
    _, report = api.prune(model, out=tmp_path / "streamed", stream=True, **fields)
    assert report["model"]["streamed"] and report["format"] == ("pack-quantized" if fmt == "compressed" else "dense")
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from llmprune.files import read_header, weight_files

    stored = {k for f in weight_files(tmp_path / "streamed") for k in read_header(f)}
    assert not any(k.endswith("weight_zero_point") for k in stored)  # symmetric: no zero points stored
    assert any(k.endswith("weight_packed") for k in stored) == (fmt == "compressed")
    assert any(k.endswith("weight_scale") for k in stored) == (fmt == "compressed")
    loaded = llmprune.load(str(tmp_path / "streamed"))[0]
    assert pattern_holds(loaded.model.layers[1].mlp.up_proj.weight, Pattern(2, 4))


def test_gptq_equals_the_textbook_loop_in_float64():
    """GPTQ by its definition, one column at a time in float64 (no blocks, no lazy updates): round column i with its
    group's scales (chosen when the group starts, over its kept weights), zero it where pruned, and move the columns after it by
    err · U[i, i+1:] / U[i, i] with U the upper Cholesky factor of H⁻¹. Ours (blocked, fp32) gives the same codes."""
    from llmprune.quant import qparams

    X = realistic_inputs(1024, 48).double()
    g = torch.Generator().manual_seed(7)
    W = torch.randn(12, 48, generator=g)
    W[torch.rand(12, 48, generator=g) < 0.4] = 0
    scheme = QuantScheme(4, 16, False)
    H = 2 * X.T @ X / X.shape[0]
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(48, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Wd, pruned, out = W.double().clone(), W == 0, torch.zeros(12, 48, dtype=torch.float64)
    for i in range(48):
        if i % 16 == 0:
            kept = Wd[:, i : i + 16].masked_fill(pruned[:, i : i + 16], 0)  # a pruned weight rounds to 0, in any range
            scale, zero = qparams(kept.amin(1), kept.amax(1), scheme)
            scale, zero = scale.double(), zero.double()
        q = ((torch.round(Wd[:, i] / scale) + zero).clamp(scheme.qmin, scheme.qmax) - zero) * scale
        q[pruned[:, i]] = 0
        out[:, i] = q
        Wd[:, i + 1 :] -= ((Wd[:, i] - q) / U[i, i]).unsqueeze(1) * U[i, i + 1 :].unsqueeze(0)
    ours = sparsegpt_on(X.float(), 48).quantize_many([W], [pruned], scheme, actorder=False)[0]
    assert (ours.weight.double() - out).abs().max() < 1e-4, (ours.weight.double() - out).abs().max()


def test_eval_and_convert_read_a_quantized_checkpoint(tiny_model_dir, text_file, tmp_path):
    assert prune_cli(tiny_model_dir("llama"), text_file, tmp_path / "q", "--pattern", "2:4", "--quantize", "w4a16",
                     "--group-size", "32", "--asymmetric").exit_code == 0
    converted = runner.invoke(app, ["convert", str(tmp_path / "q"), "--format", "dense", "--out", str(tmp_path / "d")])
    assert converted.exit_code == 0, converted.output
    a, b = llmprune.load(str(tmp_path / "q"))[0].state_dict(), llmprune.load(str(tmp_path / "d"))[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "q"), str(tmp_path / "d"), "--ppl", str(text_file),
                                    "--seqlen", "32", "--max-windows", "2", "--json", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    models = json.loads(evaluated.stdout)["models"]
    assert models[0]["ppl"] == models[1]["ppl"]


@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, True, observer="mse"), QuantScheme(4, 16, False), QuantScheme(8, 0, True)],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("sparsity,pattern", [(0.0, Pattern()), (0.5, Pattern()), (0.5, Pattern(2, 4))],
                         ids=["gptq alone", "50%", "2:4"])
def test_descent_lowers_the_layer_error_and_keeps_every_zero(scheme, sparsity, pattern):
    """Coordinate descent on GPTQ's codes (quant.descend_codes) towards the weight before pruning: the layer error
    never grows from pass to pass and drops clearly, the pruned positions stay 0 (an N:M pattern holds), the
    weight is its codes times its (unchanged) scales, and once converged no single code moved by one step lowers
    the error: every coordinate is optimal on the grid."""
    from llmprune.masks import pattern_holds

    X = realistic_inputs(2048, 64)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    solver = sparsegpt_on(X, 64)
    pruned = solver.prune(W, sparsity, pattern) == 0 if sparsity else torch.zeros_like(W, dtype=torch.bool)
    q = solver.quantize_many([W], [pruned], scheme, False)[0]
    H, _ = solver.dampened_hessian()
    errors = [layer_error(W, q.weight, X)]
    for passes in (1, 2, 3, 200):
        d = solver.descend_many([q], [W], [pruned], scheme, passes)[0]
        errors.append(layer_error(W, d.weight, X))
        assert torch.equal(d.scale, q.scale) and torch.equal(d.zero, q.zero)
        assert torch.equal(d.weight, dequantize(d.codes, d.scale, d.zero))
        assert (d.weight[pruned] == 0).all() and (d.codes >= scheme.qmin).all() and (d.codes <= scheme.qmax).all()
        if pattern.structured:
            assert pattern_holds(d.weight, pattern)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[3] < (0.97 if sparsity else 0.995) * errors[0], errors  # GPTQ alone leaves less to gain
    torch.testing.assert_close(solver.descend_many([q], [W], [pruned], scheme, 3)[0].weight,
                               solver.descend_many([q], [W], [pruned], scheme, 3)[0].weight, rtol=0, atol=0)

    def error(Wq):  # the objective descent minimises, in float64
        R = (W - Wq).double()
        return float(torch.einsum("oi,ij,oj->", R, H.double(), R))

    best = error(d.weight)
    g = scheme.group_size or 64
    for row, col in torch.nonzero(~pruned)[torch.randperm(int((~pruned).sum()), generator=torch.Generator().manual_seed(0))[:40]]:
        for step in (-1, 1):
            code = int(d.codes[row, col]) + step
            if scheme.qmin <= code <= scheme.qmax:
                moved = d.weight.clone()
                moved[row, col] = (code - d.zero[row, col // g]) * d.scale[row, col // g]
                assert error(moved) >= best * (1 - 1e-9), (row, col, step)


def test_descent_after_pruning_beats_gptq_on_the_pruned_weight():
    """What the pruner does after a solve (GPTQ on the weight before pruning with the mask fixed, then descent
    towards it) reproduces the unpruned layer better than GPTQ rounding the pruned weight, as llm-compressor's
    SparseGPT-then-GPTQ recipe rounds it."""
    X = realistic_inputs(4096, 128)
    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(5))
    scheme = QuantScheme(4, 32, True, observer="mse")
    solver = sparsegpt_on(X, 128)
    P = solver.prune(W, 0.5, Pattern(2, 4))
    on_pruned = solver.quantize_many([P], [P == 0], scheme, False)[0]
    ours = solver.descend_many(solver.quantize_many([W], [P == 0], scheme, False), [W], [P == 0], scheme, 3)[0]
    assert layer_error(W, ours.weight, X) < 0.97 * layer_error(W, on_pruned.weight, X)


def test_descent_of_stacked_weights_is_each_weights_own():
    """descend_many runs the weights of one input (q/k/v) through one stacked column loop; rows are independent, so
    each comes out as descending it alone would give it (up to float summation order)."""
    X = realistic_inputs(2048, 64)
    gen = torch.Generator().manual_seed(11)
    Wq, Wk = torch.randn(24, 64, generator=gen), torch.randn(8, 64, generator=gen)
    scheme = QuantScheme(4, 16, True, observer="mse")
    solver = sparsegpt_on(X, 64)
    masks = [solver.prune(W, 0.5, Pattern(2, 4)) == 0 for W in (Wq, Wk)]
    quantized = solver.quantize_many([Wq, Wk], masks, scheme, False)
    together = solver.descend_many(quantized, [Wq, Wk], masks, scheme, 3)
    alone = [solver.descend_many([q], [W], [M], scheme, 3)[0] for q, W, M in zip(quantized, (Wq, Wk), masks)]
    for t, a in zip(together, alone):
        assert t.codes.shape == a.codes.shape and torch.equal(t.scale, a.scale)
        assert (t.codes == a.codes).float().mean() > 0.99
        assert (t.weight[masks[0 if t.codes.shape[0] == 24 else 1]] == 0).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("actorder", [False, True])
def test_the_compiled_column_loop_equals_the_torch_loop(scheme, actorder, monkeypatch):
    """kernels/gptq_cpu.cpp runs GPTQ's column loop (rounding, errors, the rank-1 updates inside each sub-block) on
    row slices in parallel; it must give the torch loop's weights and codes, with groups starting inside sub-blocks
    (16 inputs), a last partial block and sub-block (176 inputs), rows not a multiple of its 256-row tasks (300 and
    44 stacked) and pruned positions held at 0."""
    import llmprune.cpu_kernels as ck

    if ck.gptq_extension() is None:
        pytest.skip("the CPU GPTQ kernel cannot be built here (no C++ compiler)")
    cols = 176 if scheme.group_size in (0, 16) else 160
    X = realistic_inputs(1024, cols)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(300, cols, generator=g), torch.randn(44, cols, generator=g)]
    masks = [torch.rand(W.shape, generator=g) < 0.3 for W in weights]

    def run():
        return sparsegpt_on(X, cols).quantize_many([W.clone() for W in weights], masks, scheme, actorder=actorder)

    compiled = run()
    monkeypatch.setenv("LLMPRUNE_GPTQ_KERNEL", "0")
    ck.gptq_extension.cache_clear()
    try:
        assert ck.gptq_extension() is None
        loop = run()
    finally:
        monkeypatch.undo()
        ck.gptq_extension.cache_clear()
    for a, b, M in zip(compiled, loop, masks):
        assert torch.equal(a.codes, b.codes)
        assert torch.allclose(a.weight, b.weight, atol=1e-6, rtol=1e-5), (a.weight - b.weight).abs().max()
        assert torch.allclose(a.scale, b.scale, rtol=1e-5, atol=0)
        assert bool((a.weight[M] == 0).all())
