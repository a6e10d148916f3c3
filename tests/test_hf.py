"""transformers' own from_pretrained on llmprune checkpoints (hf.py): with llmprune imported every output loads
with the weights of the dense output bit for bit; without it, plain transformers stops with an error naming
llmprune (formats.GUARD) instead of loading random weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune import formats
from llmprune.cli.app import app

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prune(model_dir, text_file, out, *extra):
    result = CliRunner().invoke(app, [str(a) for a in ("prune", model_dir, "--method", "wanda", "--calib", text_file,
                                                       "--nsamples", 4, "--seqlen", 32, "--out", out, "--device", "cpu",
                                                       *extra)])
    assert result.exit_code == 0, result.output
    return out


def weights(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One tiny Llama pruned unstructured and 2:4, each written dense and compressed."""
    from conftest import byte_tokenizer, tiny_model
    from llmprune.data import BUNDLED

    root = tmp_path_factory.mktemp("hf")
    text = root / "calib.txt"
    text.write_text(BUNDLED["wikitext2-valid"].read_text(encoding="utf-8")[:20000], encoding="utf-8")
    source = root / "src"
    tiny_model("llama").save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    made = {}
    for pattern in ("unstructured", "2:4"):
        for fmt in ("dense", "compressed"):
            made[pattern, fmt] = prune(source, text, root / f"{pattern.replace(':', 'of')}-{fmt}", "--pattern", pattern,
                                       "--format", fmt)
            for dtype in ("float16", "bfloat16"):  # stored in that dtype (prune --dtype)
                made[pattern, fmt, dtype] = prune(source, text, root / f"{pattern.replace(':', 'of')}-{fmt}-{dtype}",
                                                  "--pattern", pattern, "--format", fmt, "--dtype", dtype)
    return made


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_outputs_stored_in_half_precision(outputs, pattern, stored):
    from transformers import AutoModelForCausalLM

    compressed, dense = outputs[pattern, "compressed", stored], outputs[pattern, "dense", stored]
    ours = weights(AutoModelForCausalLM.from_pretrained(compressed))
    assert {v.dtype for k, v in ours.items() if "proj" in k} == {DTYPES[stored]}
    assert_bitwise(ours, weights(AutoModelForCausalLM.from_pretrained(dense)))
    assert_bitwise(ours, weights(llmprune.load(str(compressed))[0]))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_from_pretrained_equals_the_dense_output_and_llmprune_load(outputs, pattern, dtype):
    from transformers import AutoModelForCausalLM

    compressed, dense = outputs[pattern, "compressed"], outputs[pattern, "dense"]
    assert json.loads((compressed / "config.json").read_text())["quantization_config"]["quant_method"] == "llmprune"
    ours = AutoModelForCausalLM.from_pretrained(compressed, dtype=DTYPES[dtype])
    reference = weights(AutoModelForCausalLM.from_pretrained(dense, dtype=DTYPES[dtype]))
    assert_bitwise(weights(ours), reference)
    assert_bitwise(weights(llmprune.load(str(compressed), dtype=dtype)[0]), reference)
    assert not hasattr(ours.config, "quantization_config") and getattr(ours, "hf_quantizer", None) is None
    ids = torch.tensor([[5, 17, 42, 7]])
    plain = AutoModelForCausalLM.from_pretrained(dense, dtype=DTYPES[dtype])
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False), plain.generate(ids, max_new_tokens=6, do_sample=False))


def test_device_map_auto_and_a_dense_resave(outputs, tmp_path):
    from transformers import AutoModelForCausalLM

    compressed, dense = outputs["unstructured", "compressed"], outputs["unstructured", "dense"]
    model = AutoModelForCausalLM.from_pretrained(compressed, device_map="auto")
    assert_bitwise(weights(model), weights(AutoModelForCausalLM.from_pretrained(dense)))
    model.save_pretrained(tmp_path / "resaved")  # an ordinary dense model now: no guard, no llmprune config
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    assert_bitwise(weights(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")), weights(model))


def test_sparse_kernels_from_the_config(outputs, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune import cpu_kernels, deploy
    from llmprune.deploy import SparseLinear

    monkeypatch.setenv("LLMPRUNE_CPU_DENSE", "ours")  # the head left dense takes our dense kernel (tiny here: any size)
    cpu_kernels.dense_kernel_wanted.cache_clear()
    monkeypatch.setattr(deploy, "speed_up_dense", lambda m, _real=deploy.speed_up_dense: _real(m, min_weights=1))

    compressed, dense = outputs["2:4", "compressed"], outputs["2:4", "dense"]
    config = AutoConfig.from_pretrained(compressed)
    config.quantization_config["sparse_kernels"] = True
    model = AutoModelForCausalLM.from_pretrained(compressed, config=config)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and all(m.layout == formats.SPARSE24 for m in sparse)
    reference = AutoModelForCausalLM.from_pretrained(dense)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    if cpu_kernels.refusal() is None:
        assert type(model.get_output_embeddings()) is deploy.DenseCPULinear
    cpu_kernels.dense_kernel_wanted.cache_clear()


def test_a_streamed_output_loads(tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    from conftest import byte_tokenizer, tiny_model

    source = tmp_path / "sharded"
    tiny_model("qwen2").save_pretrained(source, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(source)
    streamed = prune(source, text_file, tmp_path / "streamed", "--stream", "--pattern", "2:4")
    dense = prune(source, text_file, tmp_path / "dense", "--pattern", "2:4", "--format", "dense")
    assert (streamed / formats.WEIGHTS_INDEX).is_file() and not (streamed / "model.safetensors.index.json").exists()
    assert json.loads((streamed / "config.json").read_text())["quantization_config"]["weights"] == formats.WEIGHTS_INDEX
    assert_bitwise(weights(AutoModelForCausalLM.from_pretrained(streamed)),
                   weights(AutoModelForCausalLM.from_pretrained(dense)))


def test_quantizing_a_dense_model_is_refused(outputs):
    from transformers import AutoModelForCausalLM

    from llmprune.hf import LlmpruneConfig

    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(outputs["2:4", "dense"], quantization_config=LlmpruneConfig(weights="model.safetensors"))


def test_a_damaged_holder_is_an_error_not_a_random_weight(outputs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    shutil.copytree(outputs["unstructured", "compressed"], broken)
    file = broken / "llmprune-model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.compressed"] = tensors["model.layers.0.mlp.up_proj.compressed"][:-3]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(Exception, match="model.layers.0.mlp.up_proj.*corrupted"):
        AutoModelForCausalLM.from_pretrained(broken)


PLAIN = """
import sys, json
import transformers
from transformers import AutoModelForCausalLM
assert "llmprune" not in sys.modules
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as exc:
    print(json.dumps({"loaded": False, "error": f"{type(exc).__name__}: {exc}"}))
else:
    print(json.dumps({"loaded": True}))
"""


def plain_transformers(spec, env=None, cwd=None):
    """from_pretrained in a fresh interpreter that never imports llmprune."""
    done = subprocess.run([sys.executable, "-c", PLAIN, str(spec)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=cwd or Path(spec).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_plain_transformers_refuses_with_a_message_naming_llmprune(outputs, pattern):
    result = plain_transformers(outputs[pattern, "compressed"])
    assert result["loaded"] is False
    assert "llmprune" in result["error"] and "import llmprune" in result["error"] and "--format dense" in result["error"]
    assert plain_transformers(outputs[pattern, "dense"])["loaded"] is True


def test_from_a_hub_id(outputs, tmp_path):
    """A Hub id resolves through huggingface_hub's cache (offline here): the same files, the same weights."""
    from conftest import hub_cache

    cache = hub_cache(tmp_path / "hub", "alice/tiny-50", outputs["unstructured", "compressed"])
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    assert plain_transformers("alice/tiny-50", env, cwd=tmp_path)["loaded"] is False
    script = ("import sys, torch, llmprune\nfrom transformers import AutoModelForCausalLM\n"
              "a = AutoModelForCausalLM.from_pretrained('alice/tiny-50')\nb, _ = llmprune.load('alice/tiny-50')\n"
              "c = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()\n"
              "print(all(torch.equal(sa[k], sc[k]) and torch.equal(sb[k], sc[k]) for k in sc) and sa.keys() == sc.keys())\n")
    done = subprocess.run([sys.executable, "-c", script, str(outputs["unstructured", "dense"])], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env}, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("True"), done.stderr[-2000:]


def test_registration_waits_for_transformers_and_keeps_import_cheap():
    script = ("import sys, llmprune\nassert 'transformers' not in sys.modules\nimport transformers\n"
              "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
              "print(AUTO_QUANTIZER_MAPPING['llmprune'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['llmprune'].__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["LlmpruneQuantizer", "LlmpruneConfig"]


def test_a_sharded_in_memory_save_loads(tmp_path, text_file, monkeypatch):
    """The model in memory written straight in the sparse layout, in several shards (an index of llmprune's name)."""
    from transformers import AutoModelForCausalLM

    from conftest import byte_tokenizer, tiny_model
    from llmprune import checkpoint

    source = tmp_path / "src"
    tiny_model("llama").save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    monkeypatch.setattr(checkpoint, "SHARD_SIZE", "60KB")
    sharded = prune(source, text_file, tmp_path / "sharded", "--pattern", "2:4")
    dense = prune(source, text_file, tmp_path / "dense", "--pattern", "2:4", "--format", "dense")
    index = json.loads((sharded / formats.WEIGHTS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors.index.json").exists()
    assert all(name.startswith(formats.WEIGHTS_STEM) for name in index["weight_map"].values())
    assert "model.layers.0.mlp.up_proj.compressed" in index["weight_map"]
    assert json.loads((sharded / "config.json").read_text())["quantization_config"]["weights"] == formats.WEIGHTS_INDEX
    assert_bitwise(weights(AutoModelForCausalLM.from_pretrained(sharded)), weights(AutoModelForCausalLM.from_pretrained(dense)))
    assert_bitwise(weights(llmprune.load(str(sharded))[0]), weights(AutoModelForCausalLM.from_pretrained(dense)))
