"""Mixture-of-experts: every expert of every block pruned from the tokens routed to it; routers stay dense."""
from __future__ import annotations

import json

import pytest
import torch

from llmprune.recipe import AUTO_PASSES
from typer.testing import CliRunner

from conftest import VOCAB, byte_tokenizer, plan_for
from llmprune import api, calibrate
from llmprune.calibrate.pruner import BlockPruner
from llmprune.checkpoint import load_model
from llmprune.errors import LlmpruneError
from llmprune.masks import parse_pattern, pattern_holds
from llmprune.models import ExpertProjection, find_blocks, find_linears, get_weight, is_experts

FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe"]


def moe_config(family: str, layers: int = 2):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2)
    if family == "mixtral":
        return T.MixtralConfig(intermediate_size=32, num_local_experts=4, **common)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4, **common)
    if family == "qwen2_moe":  # with a shared expert and its gate
        return T.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                num_experts=4, **common)
    raise ValueError(family)


def moe_model(family: str, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(family, layers), dtype=torch.float32).eval()


@pytest.fixture
def moe_dir(tmp_path):
    def make(family: str, seed: int = 0):
        path = tmp_path / f"{family}-{seed}"
        moe_model(family, seed).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        return path
    return make


def experts_of(model):
    return [m for m in model.modules() if is_experts(m)]


def routers_of(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if n.endswith((".gate", "shared_expert_gate")) and hasattr(m, "weight")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "unstructured"), ("alps", "unstructured"),
                                           ("admm", "2:4")])
def test_every_expert_is_pruned_and_routers_stay_dense(family, method, pattern, text_file, tmp_path, moe_dir):
    from transformers import AutoModelForCausalLM

    source = moe_dir(family)
    dense_routers = routers_of(AutoModelForCausalLM.from_pretrained(source))
    model, report = api.prune(str(source), method=method, sparsity=0.5, pattern=pattern, calibration=str(text_file),
                              nsamples=8, seqlen=32, device="cpu", out=tmp_path / "out", format="dense")
    parsed = parse_pattern(pattern)
    fused = experts_of(model)
    assert len(fused) == 2
    for experts in fused:
        for param in ("gate_up_proj", "down_proj"):
            for e in range(experts.num_experts):
                W = ExpertProjection(experts, param, e, "").weight_view
                assert (W == 0).float().mean().item() == pytest.approx(0.5), (param, e)
                if parsed.structured:
                    assert pattern_holds(W, parsed)
    names = [row["name"] for row in report["linears"]]
    assert sum(".experts." in n for n in names) == 2 * 2 * 4
    assert all(row["tokens"] is not None for row in report["linears"] if ".experts." in row["name"])
    for name, W in routers_of(model).items():
        assert torch.equal(W, dense_routers[name]), f"router {name} changed"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3, 4]])).logits).all()
    for a, b in zip(experts_of(reloaded), fused):
        assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_compressed_moe_checkpoint_round_trips(family, text_file, tmp_path, moe_dir):
    from transformers import AutoModelForCausalLM

    from llmprune.checkpoint import read_state_dict

    model, report = api.prune(str(moe_dir(family)), method="sparsegpt", pattern="2:4", calibration=str(text_file),
                              nsamples=8, seqlen=32, device="cpu", out=tmp_path / "out")
    assert report["format"] == "sparse-24-bitmask"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "sparse-24-bitmask"
    stored = report["sizes"]["linear_stored_bytes"] / report["sizes"]["linear_dense_bytes"]
    assert stored < 0.6  # the experts, most of the weights, are stored compressed
    keys = set(read_state_dict(tmp_path / "out", "dense"))  # raw names: each fused parameter stored whole
    assert "model.layers.0.mlp.experts.gate_up_proj.compressed" in keys and not any(".experts.0." in k for k in keys)
    expected = model.state_dict()
    for loaded in (load_model(str(tmp_path / "out"))[0], AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert loaded.state_dict().keys() == expected.keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, expected[key]), key
    info = CliRunner().invoke(_app(), ["info", str(tmp_path / "out"), "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["pattern_ok"] is True
    per_expert = [row for row in described["linears"] if ".experts." in row["name"]]
    assert len(per_expert) == 2 * 2 * 4 and all(row["sparsity"] == pytest.approx(0.5) for row in per_expert)
    assert {row["name"] for row in per_expert} == {row["name"] for row in report["linears"] if ".experts." in row["name"]}
    assert len(described["experts"]) == 2 * 2 * 4 and all(row["tokens"] > 0 for row in described["experts"])


def _app():
    from llmprune.cli import app

    return app


def test_expert_statistics_are_those_of_the_routed_tokens():
    """Wanda's per-expert input norms, computed by hand from the router's choice on the dense block."""
    import torch.nn.functional as F

    model = moe_model("mixtral", layers=1)
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(1))
    moe = model.model.layers[0].mlp
    seen = {}
    moe.experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
        x = seen["x"]  # [tokens, hidden]
        probs = F.softmax(x @ moe.gate.weight.T, dim=-1)
        chosen = probs.topk(2, dim=-1).indices
        expected = {}
        for e in range(4):
            routed = x[(chosen == e).any(-1)]
            gate, up = (routed @ moe.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
            expected[f"model.layers.0.mlp.experts.gate_up_proj.{e}"] = (routed.double().square().sum(0), routed.shape[0])
            expected[f"model.layers.0.mlp.experts.down_proj.{e}"] = (hidden.double().square().sum(0), routed.shape[0])

    captured = {}
    original = BlockPruner._solve

    def solve(self, solver, members):
        if ".experts." in members[0]:
            captured[members[0]] = (solver.sq_norms.clone(), self.tokens[members[0]])
        return original(self, solver, members)

    BlockPruner._solve = solve
    try:
        calibrate.prune_model(model, ids, plan_for(model, ids, method="wanda", sparsity=0.5, sequential=False, microbatch=2))
    finally:
        BlockPruner._solve = original
    assert set(captured) == set(expected)
    for name, (norms, tokens) in expected.items():
        assert captured[name][1] == tokens
        torch.testing.assert_close(captured[name][0], norms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantize", ["none", "w4a16"])
def test_an_expert_without_tokens_falls_back_and_is_reported(text_file, tmp_path, quantize):
    """Pruned by magnitude and, quantized, rounded to nearest: GPTQ without tokens would zero the whole expert."""
    from transformers import AutoModelForCausalLM

    model = moe_model("qwen3_moe")

    def never_three(router, args, output):  # the router's choice with expert 3's logit at -inf
        logits = output[0].clone()
        logits[:, 3] = float("-inf")
        values, indices = torch.softmax(logits, dim=-1, dtype=torch.float).topk(router.top_k, dim=-1)
        if router.norm_topk_prob:
            values = values / values.sum(dim=-1, keepdim=True)
        return output[0], values.to(output[0].dtype), indices

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_three)
    _, report = api.prune(model, tokenizer=byte_tokenizer(), method="sparsegpt", sparsity=0.5, calibration=str(text_file),
                          nsamples=8, seqlen=32, device="cpu", out=tmp_path / "out", format="dense", quantize=quantize,
                          group_size=16)
    rows = {row["name"]: row for row in report["linears"]}
    for layer in range(2):
        for param in ("gate_up_proj", "down_proj"):
            row = rows[f"model.layers.{layer}.mlp.experts.{param}.3"]
            assert row["tokens"] == 0 and row["fallback"] == "magnitude"
            assert row["sparsity"] == pytest.approx(0.5) if quantize == "none" else 0.5 <= row["sparsity"] < 0.6
            assert rows[f"model.layers.{layer}.mlp.experts.{param}.0"]["fallback"] is None
            assert rows[f"model.layers.{layer}.mlp.experts.{param}.0"]["tokens"] > 64
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(reloaded(torch.tensor([[5, 6, 7]])).logits).all()
    result = CliRunner().invoke(_app(), ["info", str(tmp_path / "out")])
    assert result.exit_code == 0 and "magnitude (too few tokens)" in result.stdout


def test_ignore_and_targets_reach_experts_and_routers(tmp_path, moe_dir, text_file):
    source = str(moe_dir("mixtral"))
    _, report = api.prune(source, method="wanda", sparsity=0.5, calibration=str(text_file), nsamples=4, seqlen=32,
                          device="cpu", ignore=(r"experts\.down_proj",))
    names = [row["name"] for row in report["linears"]]
    assert any("gate_up_proj" in n for n in names) and not any("down_proj.2" in n for n in names)
    _, report = api.prune(source, method="magnitude", sparsity=0.5, device="cpu", targets=(r"mlp\.gate$",))
    assert [row["name"] for row in report["linears"]] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_owl_counts_the_experts(moe_dir, text_file):
    _, report = api.prune(str(moe_dir("mixtral")), method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1,
                          calibration=str(text_file), nsamples=8, seqlen=32, device="cpu")
    blocks = report["allocation"]["block_sparsity"]
    assert len(blocks) == 2 and blocks[0] != blocks[1] and all(abs(b - 0.6) <= 0.1 + 1e-9 for b in blocks)
    for row in report["linears"]:  # experts get their block's sparsity too
        block = int(row["name"].split(".")[2])
        assert row["target"] == pytest.approx(blocks[block])
    assert sum(".experts." in row["name"] for row in report["linears"]) == 16
    sizes = [row["shape"][0] * row["shape"][1] for row in report["linears"]]
    targets = [row["target"] for row in report["linears"]]
    assert sum(s * t for s, t in zip(sizes, targets)) / sum(sizes) == pytest.approx(0.6)  # OWL's weighted mean, experts in


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern,fmt", [("wanda", "unstructured", "dense"), ("sparsegpt", "2:4", "compressed")])
def test_streamed_moe_equals_in_memory(tmp_path, text_file, family, method, pattern, fmt):
    """Checkpoints store experts one tensor per expert and projection; transformers fuses them when loading. Streaming
    reads and fuses them block by block by transformers' own rules and writes them back per expert, so the output has
    the same tensors, names and bits as the in-memory run's."""
    from conftest import byte_tokenizer
    from test_streaming import assert_same, weights_index

    source = tmp_path / "src"
    moe_model(family, layers=3).save_pretrained(source, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(source)
    stored = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.0." in key for key in stored)  # per-expert tensors on disk, fused in the model
    outs = {}
    for stream in (False, True):
        outs[stream] = tmp_path / f"out-{stream}"
        _, report = api.prune(str(source), method=method, sparsity=0.5, pattern=pattern, calibration=str(text_file),
                              nsamples=8, seqlen=32, device="cpu", out=outs[stream], stream=stream, format=fmt)
        assert report["model"]["streamed"] is stream
    assert_same(outs[False], outs[True])
    written = json.loads((outs[True] / weights_index(outs[True])).read_text())["weight_map"]
    if fmt == "dense":
        assert set(written) == set(stored)
    else:  # each pruned fused parameter stored whole, under its own name
        assert not any(".experts.0." in key for key in written) and any(".experts.gate_up_proj." in key for key in written)
    model, _, _ = load_model(str(outs[True]))
    for experts in experts_of(model):
        for e in range(experts.num_experts):
            W = ExpertProjection(experts, "down_proj", e, "").weight_view
            assert (W == 0).float().mean().item() == pytest.approx(0.5)
    logits = model(torch.randint(0, VOCAB, (1, 16))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_experts_are_stored_per_expert_and_stream_the_same(family, text_file, tmp_path):
    """GPTQ rounds every expert projection from its own routed tokens, keeping 2:4; the checkpoint stores each as a
    pack-quantized linear under the per-expert name transformers converts (as llm-compressor's MoE checkpoints do),
    streamed and in memory alike, and llmprune.load gives the weights bit for bit."""
    from conftest import byte_tokenizer
    from test_streaming import assert_same

    from llmprune.checkpoint import read_state_dict
    from llmprune.masks import Pattern

    source = tmp_path / "src"
    moe_model(family).save_pretrained(source, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(source)
    outs, models = {}, {}
    for stream in (False, True):
        outs[stream] = tmp_path / f"out-{stream}"
        models[stream], report = api.prune(str(source), method="sparsegpt", pattern="2:4", calibration=str(text_file),
                                           nsamples=8, seqlen=32, device="cpu", out=outs[stream], stream=stream,
                                           quantize="w4a16", group_size=16)
        assert {r["quantized"] for r in report["linears"]} == {f"w4a16 g16 symmetric mse descent {AUTO_PASSES}"}
    assert_same(outs[False], outs[True])
    raw = read_state_dict(outs[False], "dense")  # the names as stored
    packed = {k[: -len(".weight_packed")] for k in raw if k.endswith(".weight_packed")}
    per_expert = {k for k in packed if ".experts." in k}
    assert len(per_expert) == 2 * 4 * 3 and not any(k.endswith(("gate_up_proj", "_weight_scale")) for k in raw)
    loaded, _, _ = load_model(str(outs[False]))
    for a, b in zip(experts_of(loaded), experts_of(models[False]), strict=True):
        assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)
        for e in range(a.num_experts):
            assert pattern_holds(ExpertProjection(a, "gate_up_proj", e, "").weight_view, Pattern(2, 4))
    ids = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(loaded(ids).logits, models[False](ids).logits)
    api.prune(str(source), method="sparsegpt", pattern="2:4", calibration=str(text_file), nsamples=8, seqlen=32,
              device="cpu", out=tmp_path / "dense", quantize="w4a16", group_size=16, format="dense")
    dense, _, _ = load_model(str(tmp_path / "dense"))  # ŵ as plain per-expert weights
    for a, b in zip(experts_of(dense), experts_of(models[False]), strict=True):
        assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)


def test_asymmetric_experts_are_a_one_line_error(text_file, tmp_path, moe_dir):
    with pytest.raises(LlmpruneError, match="asymmetric quantization of MoE experts would not load.*--asymmetric"):
        api.prune(str(moe_dir("mixtral")), method="wanda", calibration=str(text_file), nsamples=4, seqlen=32,
                  device="cpu", out=tmp_path / "o", quantize="w4a16", group_size=16, symmetric=False)
    assert not (tmp_path / "o").exists()


def test_streamed_moe_reads_one_block_at_a_time(tmp_path, text_file, monkeypatch):
    from conftest import byte_tokenizer
    from llmprune import partial, shards

    source = tmp_path / "src"
    moe_model("mixtral", layers=3).save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    live = []
    original = shards.ShardSource._convert

    def watch(self, full, read):
        live.append(full.split(".")[2])
        return original(self, full, read)
    monkeypatch.setattr(shards.ShardSource, "_convert", watch)
    api.prune(str(source), method="wanda", sparsity=0.5, calibration=str(text_file), nsamples=4, seqlen=32, device="cpu",
              out=tmp_path / "o", stream=True)
    assert live == ["0", "0", "1", "1", "2", "2"]  # each block's fused experts built when the block is reached


def test_router_linears_are_found_structurally():
    model = moe_model("qwen2_moe")
    blocks_name, blocks = find_blocks(model)
    plain = find_linears(blocks[0], f"{blocks_name}.0")
    assert "model.layers.0.mlp.shared_expert.up_proj" in plain
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in plain)
    with_experts = find_linears(blocks[0], f"{blocks_name}.0", experts=True)
    projections = [p for p in with_experts.values() if isinstance(p, ExpertProjection)]
    assert len(projections) == 2 * 4
    assert get_weight(projections[0]).shape == (64, 64) and get_weight(projections[-1]).shape == (64, 32)


def test_dsnot_refines_experts_from_their_own_tokens(text_file, moe_dir):
    _, report = api.prune(str(moe_dir("qwen3_moe")), method="wanda", sparsity=0.6, refine="dsnot", calibration=str(text_file),
                          nsamples=8, seqlen=32, device="cpu")
    experts = [row for row in report["linears"] if ".experts." in row["name"] and not row["fallback"]]
    assert experts and all(row["refine"] is not None and row["sparsity"] == pytest.approx(0.6, abs=1 / 32) for row in experts)  # per row
    assert all(row["refine"]["error_after"] <= row["refine"]["error_before"] for row in experts)


@pytest.mark.parametrize("stream", [False, True])
def test_quantized_experts_resume_to_the_uninterrupted_result(stream, text_file, tmp_path, monkeypatch):
    """A quantized MoE run stopped after its first block and resumed writes the checkpoint an uninterrupted run
    writes: the experts' scale and zero point buffers travel in the resume state and are packed per expert."""
    from test_streaming import assert_same, interrupt_after

    source = tmp_path / "src"
    moe_model("qwen3_moe", layers=3).save_pretrained(source, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(source)
    fields = dict(method="sparsegpt", pattern="2:4", calibration=str(text_file), nsamples=8, seqlen=32, device="cpu",
                  stream=stream, quantize="w4a16", group_size=16)
    api.prune(str(source), out=tmp_path / "whole", **fields)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 0)
        with pytest.raises(LlmpruneError, match=r"interrupted after 1 of 3 blocks; continue with --resume"):
            api.prune(str(source), out=tmp_path / "out", **fields)
    _, report = api.prune(str(source), out=tmp_path / "out", resume=True, **fields)
    assert report["resumed_after_block"] == 1
    assert_same(tmp_path / "whole", tmp_path / "out")
    loaded, _, _ = load_model(str(tmp_path / "out"))
    whole, _, _ = load_model(str(tmp_path / "whole"))
    for a, b in zip(experts_of(loaded), experts_of(whole), strict=True):
        assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)
