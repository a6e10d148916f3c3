"""plan.py: every decision about where and how a run goes, made once and frozen."""
import dataclasses

import pytest
import torch

from conftest import VOCAB, tiny_model
from llmprune import plan
from llmprune.distributed import SINGLE
from llmprune.errors import LlmpruneError
from llmprune.recipe import Recipe


def windows(n=8, seqlen=32):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_the_plan_is_frozen_and_says_what_resume_compares():
    model = tiny_model("llama")
    recipe = Recipe.create(method="wanda", sparsity=0.5, seqlen=32)
    decided = plan.decide(recipe, model, windows(), device=torch.device("cpu"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decided.sequential = False
    assert decided.to_dict() == {"recipe": recipe.to_dict(), "seqlen": 32, "dtype": "float32",
                                 "microbatch": plan.default_microbatch(32), "processes": 1, "two_pass": False}
    assert decided.microbatch == 2048 // 32 and decided.activations is None and decided.needs_data
    assert plan.decide(Recipe.create(method="magnitude", sparsity=0.5), model, None, device=torch.device("cpu")).microbatch is None


def test_sparsity_of_takes_overrides_then_the_allocation_then_the_recipe():
    recipe = Recipe.create(method="wanda", sparsity=0.6, overrides={r"mlp\.down_proj": 0.3})
    decided = plan.decide(recipe, tiny_model("llama"), windows(), device=torch.device("cpu"))
    assert decided.sparsity_of(0, "model.layers.0.self_attn.q_proj") == 0.6
    assert decided.sparsity_of(1, "model.layers.1.mlp.down_proj") == 0.3
    owl = decided.with_allocation([0.55, 0.65])
    assert owl.sparsity_of(1, "model.layers.1.self_attn.q_proj") == 0.65 and owl.sparsity_of(0, "x.mlp.down_proj") == 0.3
    assert decided.block_sparsity is None  # with_allocation made a new plan


def test_seqlen_is_capped_at_the_models_positions():
    model = tiny_model("llama")  # 256 positions
    assert plan.capped_seqlen(128, model) == (128, None)
    seqlen, note = plan.capped_seqlen(4096, model)
    assert seqlen == 256 and "capped" in note


def test_activations_follow_free_memory(monkeypatch, tmp_path):
    model = tiny_model("llama")
    ids = windows()
    lockstep, two_pass = (plan.activation_bytes(ids, model, SINGLE, s) for s in (True, False))
    assert two_pass < lockstep
    cpu = torch.device("cpu")
    monkeypatch.setattr(plan, "free_memory", lambda device=None: 10 * lockstep)
    assert plan.place_activations(None, ids, model, tmp_path, SINGLE, cpu, True) == (None, True, ())
    monkeypatch.setattr(plan, "free_memory", lambda device=None: (lockstep + two_pass) // 2)
    where, sequential, notes = plan.place_activations(None, ids, model, tmp_path, SINGLE, cpu, True)
    assert where is None and not sequential and "two-pass" in notes[0]
    monkeypatch.setattr(plan, "free_memory", lambda device=None: two_pass // 2)
    assert plan.place_activations(None, ids, model, tmp_path, SINGLE, cpu, True) == (tmp_path / "activations", False, ())
    asked = plan.place_activations(tmp_path / "mine", ids, model, None, SINGLE, cpu, True)
    assert asked == (tmp_path / "mine", False, ())  # lockstep needs every micro-batch at once
    decided = plan.decide(Recipe.create(method="wanda", sparsity=0.5), model, ids, device=cpu, activations=tmp_path / "mine")
    assert decided.activations == tmp_path / "mine" and not decided.sequential and decided.to_dict()["two_pass"]


def test_devices():
    assert plan.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(LlmpruneError, match="unknown device 'gpu9'"):
        plan.resolve_device("gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(LlmpruneError, match="no CUDA GPU"):
            plan.resolve_device("cuda")


def test_streaming_is_decided_from_the_size_and_the_flags(tmp_path, monkeypatch):
    from conftest import byte_tokenizer

    source = tmp_path / "m"
    tiny_model("llama").save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    assert plan.should_stream(source, None, None, what="m") is False
    assert plan.should_stream(source, True, None, what="m") is True and plan.should_stream(source, False, None, what="m") is False
    monkeypatch.setattr(plan, "free_memory", lambda device=None: 1000)
    assert plan.should_stream(source, None, None, what="m") is True  # more than half the free memory
    with pytest.raises(LlmpruneError, match="could not fetch"):
        plan.should_stream(None, True, None, what="alice/x")
