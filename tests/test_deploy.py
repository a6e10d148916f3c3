import logging

import pytest
import torch

from conftest import plan_for, tiny_model
from llmprune import calibrate, deploy, formats
from llmprune.masks import Pattern


def windows(n=4, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("pattern,layout", [(Pattern(2, 4), formats.SPARSE24), (Pattern(), formats.BITMASK)])
def test_sparsified_model_computes_the_pruned_models_logits(arch, pattern, layout, caplog):
    model = tiny_model(arch)
    calibrate.prune_model(model, None, plan_for(model, method="magnitude", sparsity=None if pattern.structured else 0.6, pattern=pattern))
    ids = windows(2, 12)
    expected = model(ids).logits
    report = deploy.sparsify(model)
    layers = [m for m in model.modules() if isinstance(m, deploy.SparseLinear)]
    assert report["swapped"] == len(layers) > 0 and all(m.layout == layout for m in layers)
    assert report["stored_bytes"] < 0.7 * report["dense_bytes"]
    with caplog.at_level(logging.WARNING, logger="llmprune.deploy"):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_a_bf16_model_on_the_cpu_keeps_its_logits():
    """A model loaded in bf16 runs our kernels with bf16 activations (the dot-product path where the CPU has
    AVX-512 BF16): its logits stay those of the dense bf16 model within bf16 rounding, its greedy tokens equal."""
    model = tiny_model("llama")
    calibrate.prune_model(model, None, plan_for(model, method="magnitude", sparsity=0.5))
    model = model.to(torch.bfloat16)
    ids = windows(2, 12)
    expected = model(ids).logits.float()
    tokens = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    report = deploy.sparsify(model, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, deploy.SparseLinear)]
    assert report["swapped"] == len(layers) > 0 and all(m.values.dtype == torch.bfloat16 for m in layers)
    got = model(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False), tokens)


def test_dense_weight_round_trips_exactly():
    W = torch.randn(24, 40)
    W[W.abs() < 0.8] = 0
    layer = deploy.SparseLinear(W, None, formats.BITMASK)
    assert torch.equal(layer.dense_weight(), W)


def test_fallback_says_once_why(caplog, monkeypatch):
    """Where the CPU kernels cannot run (here: told they cannot build), the weight is expanded per call, said once."""
    from llmprune import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "refusal", lambda: "no C++ compiler ('c++') is on PATH to build the CPU kernels")
    deploy._warned.clear()
    W = torch.randn(8, 16)
    W[:, ::2] = 0
    layer = deploy.SparseLinear(W, torch.zeros(8), formats.SPARSE24)
    x = torch.randn(3, 16)
    with caplog.at_level(logging.WARNING, logger="llmprune.deploy"):
        torch.testing.assert_close(layer(x), x @ W.T)
        layer(torch.randn(3, 16))
    messages = [r.message for r in caplog.records if "sparse kernels not used" in r.message]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]


def test_dense_linears_stay():
    model = tiny_model("llama")
    assert deploy.sparsify(model)["swapped"] == 0


def test_load_with_sparse_kernels(tmp_path):
    import llmprune

    model = tiny_model("llama")
    calibrate.prune_model(model, None, plan_for(model, method="magnitude", pattern="2:4"))
    model.save_pretrained(tmp_path / "m")
    from conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "m")
    dense, _ = llmprune.load(str(tmp_path / "m"))
    sparse, _ = llmprune.load(str(tmp_path / "m"), device="cpu", sparse_kernels=True)
    assert any(isinstance(m, deploy.SparseLinear) for m in sparse.modules())
    ids = windows(1, 8)
    torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA GPU is visible")
def test_bench_without_a_gpu_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from llmprune.cli import app

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--device", "cuda"])
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.stderr
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--device", "tpu"])
    assert result.exit_code == 2 and "--device must be" in result.stderr


def test_bench_on_the_cpu(tmp_path):
    """`llmprune bench --device cpu` on a small pruned model: every contender timed, the same greedy tokens."""
    import json

    from typer.testing import CliRunner

    from conftest import byte_tokenizer

    from llmprune import api, cpu_kernels
    from llmprune.cli import app

    if cpu_kernels.refusal() is not None:
        pytest.skip(cpu_kernels.refusal())
    api.prune(tiny_model("llama"), tokenizer=byte_tokenizer(), method="magnitude", sparsity=0.5, out=str(tmp_path / "m"))
    args = ["bench", str(tmp_path / "m"), "--device", "cpu", "--tokens", "1,9,20", "--repeats", "3",
            "--decode-tokens", "6", "--prompt", "5", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["environment"]["kernel_isa"] == cpu_kernels.best_isa() and data["environment"]["copy_gbs"] > 0
    rows = data["kernels"]
    assert {r["tokens"] for r in rows} == {1, 9, 20} and {r["method"] for r in rows} == {"expand", "gather"}
    for r in rows:
        assert all(r[k] > 0 for k in ("dense_s", "dense_bf16_s", "csr_s", "ours_float32_s", "ours_bfloat16_s"))
        assert r["ours_float32_rel_err"] < 1e-5 and r["ours_bfloat16_rel_err"] < 1e-5
        assert r["ours_bfloat16_model_s"] > 0 and "ours_float32_model_s" not in r
    decode = data["decode"]
    assert decode["ours_float32"]["same_tokens"] and decode["ours_float32"]["swapped"] > 0
    assert decode["dense"]["tokens_per_s"] > 0 and decode["ours_bfloat16"]["breakdown"]["step_s"] > 0
    for name in ("dense", "ours_float32"):  # the head is timed apart from the blocks' linears, not left in "Python"
        br = decode[name]["breakdown"]
        assert br["head_s"] > 0 and br["linears_s"] > 0
        assert br["linears_s"] + br["head_s"] + br["other_ops_s"] + br["python_s"] == pytest.approx(br["step_s"], rel=0.05)
    head = tiny_model("llama").get_output_embeddings().weight.numel()  # the one linear left dense
    assert decode["ours_float32"]["dense_kernel"] == int(cpu_kernels.dense_kernel_wanted() and head >= 1 << 16)
    in_bf16 = decode["ours_bfloat16_model"]
    assert in_bf16["swapped"] == decode["ours_float32"]["swapped"] and decode["dense_bfloat16"]["tokens_per_s"] > 0
    assert in_bf16["speedup_over_same_dtype"] > 0 and in_bf16["breakdown"]["step_s"] > 0
    table = CliRunner().invoke(app, args[:-1])
    assert table.exit_code == 0 and "the model in bfloat16" in table.stdout and "+ head " in table.stdout, table.output
    bad = CliRunner().invoke(app, ["bench", str(tmp_path / "m"), "--device", "cpu", "--values-dtype", "int8"])
    assert bad.exit_code == 2 and "--values-dtype" in bad.stderr


def _gpu_ready():
    from llmprune import kernels

    return torch.cuda.is_available() and kernels.capability_refusal(torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU of compute capability 8.0+ and CuPy (pip install 'llmprune[cuda]' or 'llmprune[cuda13]')")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern,layout", [(Pattern(2, 4), formats.SPARSE24), (Pattern(), formats.BITMASK)])
def test_sparsified_model_on_the_gpu_runs_the_kernels(dtype, pattern, layout, caplog):
    model = tiny_model("llama")
    calibrate.prune_model(model, None, plan_for(model, method="magnitude", sparsity=None if pattern.structured else 0.6, pattern=pattern))
    model = model.to("cuda", dtype).eval()
    ids = windows(2, 40).cuda()  # 80 tokens: the prefill GEMM; generate()'s steps: the decode kernels
    expected = model(ids).logits.float()
    deploy._warned.clear()
    report = deploy.sparsify(model)
    assert report["swapped"] > 0 and all(m.values.is_cuda for m in model.modules() if isinstance(m, deploy.SparseLinear))
    with caplog.at_level(logging.WARNING, logger="llmprune.deploy"):
        got = model(ids).logits.float()
        out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert not [r for r in caplog.records if "not used" in r.message]
    assert float((got - expected).norm() / expected.norm()) < (5e-3 if dtype == torch.float16 else 3e-2)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("tokens", ["1,x", "0,16", ""])
def test_bench_bad_token_counts_are_one_line_errors(tmp_path, tokens):
    from typer.testing import CliRunner

    from llmprune.cli import app

    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--tokens", tokens])
    assert result.exit_code == 2 and "--tokens" in result.stderr and len(result.stderr.strip().splitlines()) == 1
