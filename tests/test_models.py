import mmap
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from llmprune.errors import LlmpruneError
from llmprune.models import find_blocks, find_linears, get_weight, load_model, release_mapped_, resolve_source, set_weight_


def test_resolve_sources(tmp_path, tiny_model_dir):
    directory = tiny_model_dir("llama")
    assert resolve_source(str(directory)).kind == "dir"
    assert resolve_source("meta-llama/Llama-3.2-1B").kind == "hub"
    assert resolve_source("gpt2").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_source(str(gguf))
    assert source.kind == "gguf" and source.gguf_file == "m.gguf"


@pytest.mark.parametrize("spec,message", [
    ("./does/not/exist", "does not exist"),
    ("/nope/model", "does not exist"),
    ("no such model", "does not exist"),
])
def test_missing_paths(spec, message):
    with pytest.raises(LlmpruneError, match=message):
        resolve_source(spec)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(LlmpruneError, match="not a model .no config.json"):
        resolve_source(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(LlmpruneError, match="not a .gguf model"):
        resolve_source(str(path))


@pytest.mark.parametrize("arch,blocks_name,count", [("llama", "model.layers", 7), ("opt", "model.decoder.layers", 6),
                                                    ("gpt2", "transformer.h", 4), ("phi", "model.layers", 6),
                                                    ("gemma3", "model.layers", 7), ("qwen2", "model.layers", 7)])
def test_blocks_and_linears_are_found_structurally(arch, blocks_name, count):
    model = tiny_model(arch)
    name, blocks = find_blocks(model)
    assert name == blocks_name and len(blocks) == 2
    linears = find_linears(blocks[0], f"{name}.0")
    assert len(linears) == count
    assert not any("lm_head" in n or "embed" in n for n in linears)
    assert len(find_linears(blocks[0], f"{name}.0", ignore=(r"\.0\.",))) == 0


def test_conv1d_weights_are_seen_as_out_in():
    model = tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D: stores [in=64, out=256]
    W = get_weight(c_fc)
    assert W.shape == (256, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(c_fc(x), x @ W.T + c_fc.bias)
    set_weight_(c_fc, torch.zeros(256, 64))
    assert torch.all(c_fc.weight == 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released through /proc/self/maps (Linux)")
def test_set_weight_swaps_in_the_new_weight_and_releases_the_mapped_one(tiny_model_dir):
    model, _, _ = load_model(str(tiny_model_dir("llama")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name, linear = next((n, m) for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and m.weight.numel() * 4 >= 3 * mmap.PAGESIZE and "lm_head" not in n)
    param, old = linear.weight, linear.weight.data
    W = torch.randn_like(old)
    set_weight_(linear, W)
    assert linear.weight is param and linear.weight.data_ptr() == W.data_ptr()  # swapped, same Parameter
    x = torch.randn(2, W.shape[1])
    torch.testing.assert_close(linear(x), x @ W.T)
    # the replaced weight lay in the checkpoint's private mapping: its whole pages went back to the file, which
    # still holds the loaded values; every other weight (some share a page with it) is untouched
    torch.testing.assert_close(old, before[name + ".weight"], rtol=0, atol=0)
    for n, p in model.named_parameters():
        if n != name + ".weight":
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    mapped = next(m.weight.data for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and m is not linear and m.weight.numel() * 4 >= 3 * mmap.PAGESIZE and "lm_head" not in n)
    assert release_mapped_(mapped)
    assert not release_mapped_(torch.randn(4096))  # anonymous memory is never released
    # a weight that cannot be swapped in (another dtype, a view) is copied into the layer's own storage
    set_weight_(linear, torch.ones(W.shape[1], W.shape[0], dtype=torch.float64).T)
    assert linear.weight.data_ptr() == W.data_ptr() and torch.all(linear.weight == 1)


def test_load_directory_and_dtype(tiny_model_dir):
    model, tokenizer, source = load_model(str(tiny_model_dir("qwen2")), dtype="bfloat16")
    assert source.kind == "dir" and next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer("abc").input_ids
    with pytest.raises(LlmpruneError, match="unknown dtype"):
        load_model(str(tiny_model_dir("qwen2", 1)), dtype="float8")


def test_bad_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(LlmpruneError, match="could not read GGUF"):
        load_model(str(path))


def test_greedy_decode_passes_the_cache_by_its_current_name(monkeypatch):
    """The CPU bench's decode loop gives the KV cache under the name this transformers takes and reads it back by
    field, so the deprecation warning of transformers 5.2x never fires, and its tokens are generate()'s."""
    import transformers.utils.generic as generic

    from llmprune.bench_cpu import greedy_decode
    from llmprune.models import cache_keyword

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: warned.append(message))
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:  # transformers 5.25 says it with a FutureWarning too
        warnings.simplefilter("always")
        _, _, tokens = greedy_decode(model, ids, 6)
    warned += [str(w.message) for w in caught]
    assert cache_keyword(model) in ("cache", "past_key_values")
    assert not [m for m in warned if "deprecated" in m], warned
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert tokens == expected
