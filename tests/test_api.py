"""api.py: prune() and its two kinds of input, the recipe (what) and the run options (how)."""
import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from llmprune import api
from llmprune.errors import LlmpruneError
from llmprune.recipe import Recipe


def test_fields_go_to_the_recipe_or_the_options(text_file):
    model = tiny_model("llama")
    _, report = api.prune(model, tokenizer=byte_tokenizer(), method="wanda", sparsity=0.5, calibration=str(text_file),
                          nsamples=4, seqlen=32, device="cpu", microbatch=2, sequential=False)
    assert report["recipe"]["method"] == "wanda" and report["recipe"]["sequential"] is False
    assert report["device"] == "cpu" and report["seqlen_used"] == 32 and report["sparsity"] == pytest.approx(0.5)
    assert {"load_s", "data_s", "prune_s"} <= set(report["timings"])
    options = api.RunOptions(device="cpu", microbatch=2)
    recipe = Recipe.create(method="magnitude", sparsity=0.4)
    _, again = api.prune(tiny_model("llama"), recipe=recipe, options=options)
    assert again["recipe"] == recipe.to_dict()
    with pytest.raises(TypeError, match="not both"):
        api.prune(tiny_model("llama"), recipe=recipe, method="wanda")
    with pytest.raises(TypeError):
        api.RunOptions(colour="red")


def test_a_loaded_model_needs_its_tokenizer_for_calibration():
    with pytest.raises(LlmpruneError, match="pass the model's tokenizer"):
        api.prune(tiny_model("llama"), method="wanda", sparsity=0.5, device="cpu")


def test_resume_and_stream_need_out():
    for flag in ("resume", "stream"):
        with pytest.raises(LlmpruneError, match=f"--{flag} needs --out"):
            api.prune(tiny_model("llama"), method="magnitude", sparsity=0.5, **{flag: True})


def test_the_model_in_memory_is_pruned_in_place():
    model = tiny_model("llama")
    pruned, report = api.prune(model, method="magnitude", pattern="2:4", device="cpu")
    assert pruned is model
    W = model.model.layers[0].mlp.up_proj.weight
    assert (W == 0).float().mean().item() == pytest.approx(0.5)
    assert len(report["linears"]) == 14 and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
