"""Interoperability with compressed-tensors 0.14.0.1, the last release with the sparse compressors.

It pins transformers<5, so it is installed apart (pip --no-deps --target) and run in a subprocess through
eval/ct014_interop.py; set LLMPRUNE_CT014_DIR to reuse an existing install.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import llmprune
from llmprune.cli.app import app

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "ct014_interop.py"


@pytest.fixture(scope="module")
def ct014(tmp_path_factory):
    given = os.environ.get("LLMPRUNE_CT014_DIR")
    target = Path(given) if given else tmp_path_factory.mktemp("ct014")
    if not (target / "compressed_tensors").is_dir():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               "compressed-tensors==0.14.0.1", "loguru"], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"could not install compressed-tensors 0.14.0.1: {done.stderr.strip().splitlines()[-1:]}")
    return target


def theirs(ct014, *args):
    env = {**os.environ, "PYTHONPATH": str(ct014)}
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def prune(model_dir, text_file, out, pattern, fmt):
    result = CliRunner().invoke(app, [str(a) for a in ("prune", model_dir, "--method", "sparsegpt", "--pattern", pattern,
                                                       "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
                                                       "--out", out, "--device", "cpu", "--format", fmt)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_their_decompressor_reads_our_checkpoint(ct014, tiny_model_dir, text_file, tmp_path, pattern):
    ours = prune(tiny_model_dir("llama"), text_file, tmp_path / "ours", pattern, "compressed-tensors")
    theirs(ct014, "decompress", ours, tmp_path / "theirs.safetensors")
    decompressed = load_file(tmp_path / "theirs.safetensors")
    expected = llmprune.load(str(ours))[0].state_dict()
    pruned = [k for k in decompressed if ".layers." in k and k.endswith("proj.weight")]
    assert len(pruned) == 14
    for key, value in decompressed.items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("pattern,fmt", [("2:4", "sparse-24-bitmask"), ("unstructured", "sparse-bitmask")])
def test_we_read_a_checkpoint_their_compressor_wrote(ct014, tiny_model_dir, text_file, tmp_path, pattern, fmt):
    dense = prune(tiny_model_dir("qwen2"), text_file, tmp_path / "dense", pattern, "dense")
    theirs(ct014, "compress", dense, tmp_path / "theirs", fmt)
    stored = load_file(tmp_path / "theirs" / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.bitmask" in stored
    a = llmprune.load(str(dense))[0].state_dict()
    b = llmprune.load(str(tmp_path / "theirs"))[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from llmprune.describe import describe

    info = describe(tmp_path / "theirs")  # `llmprune info` on another tool's checkpoint
    assert info["format"] == fmt and info["sizes"]["linear_ratio"] < 1
    if pattern == "2:4":
        assert info["pattern"] == "2:4" and info["pattern_ok"] is True
