"""Compressed checkpoints through the CLI: prune --format, load, info, convert, push, and bad input."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import byte_tokenizer, tiny_model
from llmprune.cli.app import app
from llmprune.errors import LlmpruneError

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def prune(model_dir, text_file, out, *extra):
    result = run("prune", model_dir, "--method", "sparsegpt", "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
                 "--out", out, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    return out


def all_tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def params(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("block", ["compressed", "compressed-tensors"])
@pytest.mark.parametrize("pattern,fmt", [("2:4", "sparse-24-bitmask"), ("unstructured", "sparse-bitmask")])
def test_compressed_checkpoint_layout_and_exact_reload(tiny_model_dir, text_file, tmp_path, pattern, fmt, block):
    import llmprune
    from llmprune import formats

    model_dir = tiny_model_dir("llama")
    small = prune(model_dir, text_file, tmp_path / "small", "--pattern", pattern, "--format", block)
    dense = prune(model_dir, text_file, tmp_path / "dense", "--pattern", pattern, "--format", "dense")
    config = json.loads((small / "config.json").read_text())
    qc = config["quantization_config"]
    if block == "compressed":  # llmprune's block: its own files, and the guard that stops plain transformers
        assert qc["quant_method"] == "llmprune" and qc["format"] == fmt and qc["layout_version"] == formats.LAYOUT_VERSION
        assert qc["weights"] == "llmprune-model.safetensors" and config["transformers_weights"] == formats.GUARD
        assert sorted(p.name for p in small.glob("*.safetensors")) == ["llmprune-model.safetensors"]
        sc = qc
    else:  # compressed-tensors 0.14, exactly
        assert qc["quant_method"] == "compressed-tensors" and "transformers_weights" not in config
        assert sorted(p.name for p in small.glob("*.safetensors")) == ["model.safetensors"]
        sc = qc["sparsity_config"]
        assert sc["format"] == fmt and sc["targets"] == ["Linear"]
    assert "lm_head" in sc["ignore"]
    assert sc["sparsity_structure"] == ("2:4" if pattern == "2:4" else "unstructured")
    assert sc["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    keys = set(all_tensors(small))
    parts = {"shape", "compressed", "bitmask"} | ({"row_offsets"} if fmt == "sparse-bitmask" else set())
    for part in parts:
        assert f"model.layers.1.mlp.down_proj.{part}" in keys
    assert "model.layers.1.mlp.down_proj.weight" not in keys and "model.embed_tokens.weight" in keys
    a, _ = llmprune.load(str(small))
    b, _ = llmprune.load(str(dense))
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    report = json.loads((small / "llmprune.json").read_text())
    assert report["format"] == fmt and report["sizes"]["linear_stored_bytes"] < report["sizes"]["linear_dense_bytes"]
    assert report["layout"] == ("llmprune" if block == "compressed" else "compressed-tensors")


def test_convert_both_ways_keeps_every_bit(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    import llmprune

    small = prune(tiny_model_dir("qwen2"), text_file, tmp_path / "small", "--pattern", "2:4")
    result = run("convert", small, "--format", "dense", "--out", tmp_path / "dense", "--json")
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # no llmprune needed for dense
    again = run("convert", tmp_path / "dense", "--format", "compressed", "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["format"] == "sparse-24-bitmask"
    ct = run("convert", tmp_path / "again", "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert ct.exit_code == 0, ct.output
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    reference = params(llmprune.load(str(small))[0])
    for other in (params(plain), params(llmprune.load(str(tmp_path / "again"))[0]), params(llmprune.load(str(tmp_path / "ct"))[0])):
        assert all(torch.equal(reference[k], other[k]) for k in reference)
    assert_user_error(run("convert", small, "--format", "dense", "--out", tmp_path / "dense"), "already exists")
    assert_user_error(run("convert", small, "--format", "zip", "--out", tmp_path / "x"), "unknown --format 'zip'")


def test_stored_bytes_are_values_plus_one_bit_and_row_offsets(tmp_path, text_file):
    model = tiny_model("llama").to(torch.bfloat16)
    source = tmp_path / "bf16"
    model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    small = prune(source, text_file, tmp_path / "small", "--pattern", "unstructured")
    info = json.loads(run("info", small, "--json").stdout)
    for r in info["linears"]:
        if r["sparsity"] > 0.4:
            rows, cols = r["shape"]
            assert r["stored_bytes"] == 2 * (r["numel"] - r["zeros"]) + rows * -(-cols // 8) + 8 * rows + 16
    # at realistic widths that is at most 0.57× dense for bf16 at 50% (0.5625 + row offsets)
    from llmprune import formats as compressed

    W = torch.randn(576, 1536).to(torch.bfloat16)
    W[torch.rand(576, 1536) < 0.5] = 0
    assert compressed.stored_bytes(compressed.compress_bitmask(W)) / (W.numel() * 2) <= 0.57


def test_info_reports_pattern_sizes_recipe_and_finds_a_broken_group(tiny_model_dir, text_file, tmp_path):
    dense = prune(tiny_model_dir("llama"), text_file, tmp_path / "dense", "--pattern", "2:4", "--format", "dense")
    result = run("info", dense, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["pattern"] == "2:4" and info["pattern_ok"] is True and info["recipe"]["method"] == "sparsegpt"
    assert info["versions"]["llmprune"] and info["format"] == "dense"
    table = run("info", dense)
    assert table.exit_code == 0 and "2:4 holds" in table.output and "MiB" in table.output
    file = next(dense.glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"][0, :4] = 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    info = json.loads(run("info", dense, "--json").stdout)
    assert info["pattern_ok"] is False and info["pattern_failures"] == ["model.layers.0.mlp.up_proj"]


def test_info_on_a_checkpoint_from_elsewhere(tiny_model_dir):
    info = json.loads(run("info", tiny_model_dir("gpt2"), "--json").stdout)
    assert info["format"] == "dense" and info["recipe"] is None and info["sparsity"] < 0.01


def test_info_plot(tiny_model_dir, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small")
    assert run("info", small, "--plot", tmp_path / "s.png").exit_code == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


# ---- bad input ---------------------------------------------------------------------------------------------


def test_truncated_safetensors(tiny_model_dir, text_file, tmp_path):
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small")
    file = next(small.glob("*.safetensors"))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    for command in (("info", small), ("convert", small, "--format", "dense", "--out", tmp_path / "d")):
        assert_user_error(run(*command), "truncated or corrupted")
    assert not (tmp_path / "d").exists()


def test_bitmask_disagreeing_with_values(tiny_model_dir, text_file, tmp_path):
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small")
    file = next(small.glob("*.safetensors"))
    tensors = load_file(file)
    key = "model.layers.0.self_attn.q_proj.compressed"
    tensors[key] = tensors[key][:-3].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    assert_user_error(run("info", small), "model.layers.0.self_attn.q_proj", "bitmask flags")


def test_unknown_sparsity_format(tiny_model_dir, text_file, tmp_path):
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    config["quantization_config"]["format"] = "sparse-99"
    (small / "config.json").write_text(json.dumps(config))
    assert_user_error(run("info", small), "sparse-99")
    assert_user_error(run("eval", small, "--ppl", "wikitext2-valid", "--max-windows", 1, "--seqlen", 32), "sparse-99")


def test_directory_without_weights(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir("llama") / "config.json").read_text())
    assert_user_error(run("info", empty), "no .safetensors weights")
    assert_user_error(run("convert", empty, "--format", "dense", "--out", tmp_path / "o"), "no weights")


def test_pickle_weights_need_allow_pickle(tmp_path, text_file):
    model = tiny_model("llama")
    source = tmp_path / "pickled"
    model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    for f in source.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    assert list(source.glob("*.bin"))
    assert_user_error(run("prune", source, "--method", "magnitude", "--out", tmp_path / "o"), "pickle", "--allow-pickle")
    assert not (tmp_path / "o").exists()
    assert_user_error(run("convert", source, "--format", "compressed", "--out", tmp_path / "o"), "--allow-pickle")
    assert_user_error(run("eval", source, "--ppl", text_file, "--seqlen", 32, "--max-windows", 1), "--allow-pickle")
    allowed = run("convert", source, "--format", "dense", "--out", tmp_path / "o", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    assert list((tmp_path / "o").glob("*.safetensors"))


def test_tensor_reader_reads_what_safetensors_wrote_one_tensor_at_a_time(tmp_path):
    from llmprune.checkpoint import TensorReader

    tensors = {"b.weight": torch.randn(7, 5, dtype=torch.bfloat16), "a.bias": torch.arange(3, dtype=torch.int64),
               "c.empty": torch.zeros(0, 4), "d.half": torch.randn(2, 3).half()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with TensorReader(path) as reader, safe_open(str(path), framework="pt") as handle:
        assert reader.keys() == list(handle.keys())
        for key, value in tensors.items():
            assert reader.shape(key) == tuple(value.shape) and reader.dtype(key) == value.dtype
            assert torch.equal(reader.get_tensor(key), value)
    path.write_bytes(path.read_bytes()[:-8])  # the last tensor's data cut short: refused when opened, by name
    with pytest.raises(LlmpruneError, match="lies outside the file.*truncated or corrupted"):
        TensorReader(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00notjs")
    with pytest.raises(LlmpruneError, match="not a readable safetensors file"):
        TensorReader(tmp_path / "junk.safetensors")
