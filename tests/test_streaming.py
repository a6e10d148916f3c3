"""Streaming (one block in memory at a time) and resuming from OUT.partial/ give the in-memory, uninterrupted result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import byte_tokenizer, tiny_config
from llmprune import api, partial, plan, shards
from llmprune.checkpoint import read_format, read_state_dict
from llmprune.distributed import SINGLE
from llmprune.errors import LlmpruneError

CALIB = dict(calibration=None, nsamples=8, seqlen=32, device="cpu")


def sharded_model(path: Path, arch: str = "llama", layers: int = 4, seed: int = 0, dtype=torch.float32) -> Path:
    """A tiny random model saved in several safetensors shards with an index, plus a byte tokenizer."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            setattr(config, attr, layers)
    if getattr(config, "layer_types", None):
        config.layer_types = (config.layer_types * layers)[:layers]
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).eval().save_pretrained(path, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(directory, read_format(directory) or "dense")


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def weights_index(directory):
    """The safetensors index of a sharded checkpoint: llmprune's layout has its own (formats.WEIGHTS_INDEX)."""
    from llmprune import formats

    return next(name for name in (formats.WEIGHTS_INDEX, "model.safetensors.index.json") if (directory / name).is_file())


@pytest.fixture
def calib(text_file):
    return {**CALIB, "calibration": str(text_file)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3", "qwen2"])
def test_streamed_run_equals_in_memory_bit_for_bit(tmp_path, calib, arch):
    model = sharded_model(tmp_path / "m", arch)
    for stream in (False, True):
        _, report = api.prune(str(model), method="wanda", sparsity=0.5, out=tmp_path / f"out-{stream}", stream=stream, **calib)
        assert report["model"]["streamed"] is stream
    assert_same(tmp_path / "out-False", tmp_path / "out-True")
    assert not (tmp_path / "out-True.partial").exists()
    index = json.loads((tmp_path / "out-True" / weights_index(tmp_path / "out-True")).read_text())
    for key, shard in index["weight_map"].items():  # the index is right about every tensor
        assert key in load_file(str(tmp_path / "out-True" / shard))


@pytest.mark.parametrize("method,pattern,fmt", [("sparsegpt", "2:4", "compressed"), ("magnitude", "unstructured", "dense")])
def test_streamed_output_loads_and_matches(tmp_path, calib, method, pattern, fmt):
    from transformers import AutoModelForCausalLM

    model = sharded_model(tmp_path / "m")
    for stream in (False, True):
        api.prune(str(model), method=method, pattern=pattern, out=tmp_path / f"out-{stream}", stream=stream, format=fmt, **calib)
    assert_same(tmp_path / "out-False", tmp_path / "out-True")
    assert read_format(tmp_path / "out-True") == ("sparse-24-bitmask" if fmt == "compressed" else None)
    report = json.loads((tmp_path / "out-True" / "llmprune.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    if fmt == "dense":
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out-True")
        assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_streaming_holds_one_block_at_a_time(tmp_path, calib, monkeypatch):
    model_dir = sharded_model(tmp_path / "m", layers=6)
    seen = []
    original = shards.ShardSource.materialize

    def watch(self, module, prefix, names=None):
        original(self, module, prefix, names)
        if names is None:  # a block (names are given for the weights outside the blocks)
            blocks = self._model_blocks
            seen.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    original_build = shards.ShardSource.build

    def build(self, *args, **kwargs):
        model = original_build(self, *args, **kwargs)
        self._model_blocks = model.model.layers
        assert all(p.device.type == "meta" for p in model.parameters())
        return model

    monkeypatch.setattr(shards.ShardSource, "materialize", watch)
    monkeypatch.setattr(shards.ShardSource, "build", build)
    model, _ = api.prune(str(model_dir), method="sparsegpt", sparsity=0.5, out=tmp_path / "out", stream=True, **calib)
    assert model is None
    assert seen == [1] * 6


def test_stream_names_a_missing_tensor(tmp_path, calib):
    model = sharded_model(tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = "model.layers.2.mlp.up_proj.weight"
    shard = model / index["weight_map"][victim]
    kept = {k: v for k, v in load_file(str(shard)).items() if k != victim}
    save_file(kept, str(shard), metadata={"format": "pt"})
    with pytest.raises(LlmpruneError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' is missing"):
        api.prune(str(model), method="wanda", sparsity=0.5, out=tmp_path / "out", stream=True, **calib)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_stream_needs_out_and_a_directory(tmp_path, calib):
    model = sharded_model(tmp_path / "m")
    with pytest.raises(LlmpruneError, match="--stream needs --out"):
        api.prune(str(model), method="wanda", stream=True, **calib)
    with pytest.raises(LlmpruneError, match="pass its path, not a loaded model"):
        api.prune(torch.nn.Linear(2, 2), method="magnitude", stream=True, out=tmp_path / "o")


# ---- resume ----------------------------------------------------------------------------------------


def interrupt_after(monkeypatch, block: int, every: float = 0) -> None:
    """Make the run stop (as Ctrl-C would) right after block `block` is done; the state is saved every `every` s."""
    original = partial.PartialRun.done
    monkeypatch.setattr(plan, "CHECKPOINT_SECONDS", every)

    def done(self, index, *args):
        original(self, index, *args)
        if index == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(partial.PartialRun, "done", done)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields", [dict(method="sparsegpt", sparsity=0.5), dict(method="magnitude", pattern="2:4"),
                                    dict(method="wanda", sparsity=0.6, allocation="owl", refine="dsnot"),
                                    dict(method="alps", sparsity=0.7, allocation="owl"),
                                    dict(method="admm", sparsity=0.7, allocation="owl", refine="dsnot")])
def test_resume_after_interrupt_equals_uninterrupted(tmp_path, calib, monkeypatch, stream, fields):
    model = str(sharded_model(tmp_path / "m"))
    api.prune(model, out=tmp_path / "whole", stream=stream, **fields, **calib)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(LlmpruneError, match=r"interrupted after 2 of 4 blocks; continue with --resume"):
            api.prune(model, out=tmp_path / "out", stream=stream, **fields, **calib)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.partial" / "progress.json").read_text())["done"] == 2
    with pytest.raises(LlmpruneError, match="holds an unfinished run; continue it with --resume"):
        api.prune(model, out=tmp_path / "out", stream=stream, **fields, **calib)
    _, report = api.prune(model, out=tmp_path / "out", stream=stream, resume=True, **fields, **calib)
    assert report["resumed_after_block"] == 2
    assert len(report["linears"]) == 4 * 7
    assert not (tmp_path / "out.partial").exists()
    assert_same(tmp_path / "whole", tmp_path / "out")


def test_state_is_saved_at_most_every_interval(tmp_path, calib, monkeypatch):
    """Inputs are written only when the interval has passed since the last save, after the last block too."""
    model = str(sharded_model(tmp_path / "m"))
    writes = []
    original = partial._write_inputs
    monkeypatch.setattr(partial, "_write_inputs", lambda *a: (writes.append(a[2]["block"]), original(*a)))
    api.prune(model, method="wanda", out=tmp_path / "every", checkpoint_every=0, **calib)
    assert writes == ["1", "2", "3"]
    writes.clear()
    api.prune(model, method="wanda", out=tmp_path / "rarely", checkpoint_every=3600, **calib)
    assert writes == []
    assert_same(tmp_path / "every", tmp_path / "rarely")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2, every=3600)
        with pytest.raises(KeyboardInterrupt):  # nothing saved yet: nothing to resume, nothing left behind
            api.prune(model, method="wanda", out=tmp_path / "out", **calib)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_interrupt_before_any_block_leaves_nothing(tmp_path, calib, monkeypatch):
    model = str(sharded_model(tmp_path / "m"))
    monkeypatch.setattr(partial.PartialRun, "done", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        api.prune(model, method="wanda", out=tmp_path / "out", **calib)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_resume_with_other_options_names_them(tmp_path, calib, monkeypatch):
    model = str(sharded_model(tmp_path / "m"))
    with monkeypatch.context() as patch:
        interrupt_after(patch, 0)
        with pytest.raises(LlmpruneError):
            api.prune(model, method="wanda", sparsity=0.5, out=tmp_path / "out", **calib)
    with pytest.raises(LlmpruneError, match=r"different options than the partial run .*: recipe\.sparsity 0\.6 \(the partial "
                                            r"run had 0\.5\); rerun with the same options, or delete it to start over: rm -r"):
        api.prune(model, method="wanda", sparsity=0.6, out=tmp_path / "out", resume=True, **calib)


@pytest.mark.parametrize("damage", ["progress", "block", "inputs"])
def test_corrupted_partial_says_how_to_start_over(tmp_path, calib, monkeypatch, damage):
    model = str(sharded_model(tmp_path / "m"))
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(LlmpruneError):
            api.prune(model, method="wanda", out=tmp_path / "out", **calib)
    partial = tmp_path / "out.partial"
    victim = {"progress": partial / "progress.json", "block": partial / "blocks" / "block-00001.safetensors",
              "inputs": partial / "inputs-rank0.safetensors"}[damage]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])
    result = CliRunner().invoke(_app(), ["prune", model, "--method", "wanda", "--calib", calib["calibration"], "--nsamples", "8",
                                         "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path / "out"), "--resume"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is corrupted" in lines[0] and f"rm -r '{partial}'" in lines[0], result.stderr


def _app():
    from llmprune.cli import app

    return app


def test_resume_without_partial_starts_fresh(tmp_path, calib):
    model = str(sharded_model(tmp_path / "m"))
    _, report = api.prune(model, method="magnitude", out=tmp_path / "out", resume=True, **calib)
    assert "resumed_after_block" not in report and (tmp_path / "out").is_dir()


KILLED_RUN = """
import sys, time
from llmprune import partial, shards
original = partial.PartialRun.done
def done(self, index, *args):
    original(self, index, *args)
    if index == 1:
        time.sleep(600)  # the test kills the process here
partial.PartialRun.done = done
from llmprune.cli import main
sys.argv = ["llmprune", *sys.argv[1:]]
main()
"""


def test_run_killed_after_a_block_resumes_to_the_same_result(tmp_path, text_file):
    model = str(sharded_model(tmp_path / "m", layers=4))
    args = ["prune", model, "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(text_file), "--nsamples", "8",
            "--seqlen", "32", "--device", "cpu", "--stream", "--checkpoint-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *args, "--out", str(tmp_path / "out")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = tmp_path / "out.partial" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["done"] == 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, "-m", "llmprune", *args, "--out", str(tmp_path / "out"), "--resume"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run([sys.executable, "-m", "llmprune", *args, "--out", str(tmp_path / "whole")], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same(tmp_path / "whole", tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()


# ---- activations on disk -------------------------------------------------------------------------------


def test_offloaded_activations_give_the_two_pass_result(tmp_path, calib, monkeypatch, caplog):
    model = str(sharded_model(tmp_path / "m"))
    fields = dict(method="sparsegpt", sparsity=0.5, microbatch=2, **calib)
    api.prune(model, out=tmp_path / "memory", sequential=False, **fields)
    offload = tmp_path / "acts"
    offload.mkdir()
    seen = []
    original = partial.PartialRun.done

    def done(self, index, *args):
        seen.append(sorted(p.name for p in offload.iterdir()))
        original(self, index, *args)

    monkeypatch.setattr(partial.PartialRun, "done", done)
    with caplog.at_level("WARNING"):
        _, report = api.prune(model, out=tmp_path / "disk", offload_activations=offload, **fields)
    assert "running the two-pass schedule" in caplog.text
    assert seen[0] == [f"rank0-microbatch{k:05d}.safetensors" for k in range(4)]  # 8 windows, 2 per micro-batch
    assert list(offload.iterdir()) == []  # our files are gone, the user's directory stays
    assert_same(tmp_path / "memory", tmp_path / "disk")


def test_two_pass_runs_in_memory_when_only_lockstep_would_not_fit(tmp_path, calib, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    model = str(sharded_model(tmp_path / "m"))
    api.prune(model, method="wanda", out=tmp_path / "two-pass", sequential=False, **calib)
    api.prune(model, method="wanda", out=tmp_path / "lockstep", **calib)
    loaded = AutoModelForCausalLM.from_pretrained(model)
    windows = torch.zeros(calib["nsamples"], calib["seqlen"], dtype=torch.long)
    lockstep, two_pass = (plan.activation_bytes(windows, loaded, SINGLE, s) for s in (True, False))
    assert two_pass < lockstep
    with pytest.raises(AssertionError):  # the schedules differ, so the comparison below tells which one ran
        assert_same(tmp_path / "two-pass", tmp_path / "lockstep")
    monkeypatch.setattr(plan, "free_memory", lambda device=None: (lockstep + two_pass) // 2)
    with caplog.at_level("WARNING"):
        _, report = api.prune(model, method="wanda", out=tmp_path / "short", **calib)
    assert "running the two-pass schedule" in caplog.text and "offloading" not in caplog.text
    assert any("two-pass schedule" in note for note in report["notes"])
    assert_same(tmp_path / "two-pass", tmp_path / "short")
    assert not (tmp_path / "short.partial").exists()


def test_activations_go_to_disk_by_themselves_when_memory_is_short(tmp_path, calib, monkeypatch, caplog):
    model = str(sharded_model(tmp_path / "m"))
    api.prune(model, method="wanda", out=tmp_path / "memory", sequential=False, **calib)
    monkeypatch.setattr(plan, "free_memory", lambda device=None: 10_000)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with caplog.at_level("WARNING"), pytest.raises(LlmpruneError, match="interrupted after 2 of 4"):
            api.prune(model, method="wanda", out=tmp_path / "disk", **calib)
    assert f"offloading the calibration activations to {tmp_path / 'disk.partial' / 'activations'}" in caplog.text
    api.prune(model, method="wanda", out=tmp_path / "disk", resume=True, **calib)
    assert_same(tmp_path / "memory", tmp_path / "disk")
    assert not (tmp_path / "disk.partial").exists()


def test_free_memory_is_asked_of_the_device_that_holds_the_activations(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3_000_000_000, 80_000_000_000))
    assert plan.free_memory(torch.device("cuda", 0)) == 3_000_000_000
    host = plan.free_memory(torch.device("cpu"))
    assert host is None or host != 3_000_000_000
