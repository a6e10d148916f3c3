"""torch.distributed (gloo, spawned by the test through torchrun) gives the single-process result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmprune.distributed import Dist
from test_streaming import sharded_model, tensors

REPO = Path(__file__).resolve().parents[1]


@given(st.integers(0, 40), st.integers(1, 9))
def test_shares_are_contiguous_balanced_and_cover_everything(n, world):
    items = list(range(n))
    shares = [Dist(rank, world).share(items) for rank in range(world)]
    assert [x for _, share in shares for x in share] == items
    assert all(start == (share[0] if share else start) for start, share in shares)
    sizes = [len(share) for _, share in shares]
    assert max(sizes) - min(sizes) <= 1


def torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "llmprune", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method,extra,rows_shared", [
    ("wanda", ["--sparsity", "0.5"], True),  # sequential: each solve's rows shared by the ranks
    ("sparsegpt", ["--pattern", "2:4", "--refine", "dsnot"], True),  # the same, DSnoT's reports summed over ranks
    ("sparsegpt", ["--sparsity", "0.5"], True),  # rows shared, each column block's mask chosen over all ranks' rows
    ("sparsegpt", ["--sparsity", "0.5", "--two-pass"], False),  # whole solves round-robin
    ("alps", ["--sparsity", "0.6"], False),  # one penalty schedule per layer: whole solves round-robin; H in fp64
    ("wanda", ["--pattern", "2:4", "--quantize", "w4a16", "--group-size", "32"], True),  # GPTQ after, on every rank
    ("alps", ["--sparsity", "0.5", "--quantize", "w8a16", "--group-size", "0", "--asymmetric"], False),
])
def test_two_gloo_processes_equal_one(tmp_path, text_file, method, extra, rows_shared):
    model = str(sharded_model(tmp_path / "m"))
    args = ["prune", model, "--method", method, *extra, "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
            "--microbatch", "2", "--device", "cpu", "--format", "dense"]
    one = torchrun(1, [*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, [*args, "--out", str(tmp_path / "two"), "--json", "--verbose"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert '"processes": 2' in two.stdout  # rank 0 alone reports
    assert ("solved here" in two.stderr) is rows_shared  # the path taken (rank 0's debug log)
    if "dsnot" in extra:
        single = json.loads((tmp_path / "one" / "llmprune.json").read_text())["linears"]
        double = json.loads(two.stdout)["linears"]
        assert [r["refine"]["rows"] for r in single] == [r["refine"]["rows"] for r in double]
        assert [r["refine"]["rows_refined"] for r in single] == [r["refine"]["rows_refined"] for r in double]
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert set(a) == set(b)
    if "--quantize" in extra:  # a Hessian summed in another order can move a weight across a rounding boundary
        for key in a:
            moved = (a[key] != b[key]).float().mean().item()
            assert moved < 1e-3, (key, moved)
        return
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), f"{key}: masks differ"
        if method == "wanda":
            assert torch.equal(a[key], b[key]), key
        else:  # the Hessian is summed in another order: values may differ in the last bits
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_more_processes_than_micro_batches_is_a_clear_error(tmp_path, text_file):
    model = str(sharded_model(tmp_path / "m", layers=2))
    run = torchrun(2, ["prune", model, "--method", "wanda", "--calib", str(text_file), "--nsamples", "1", "--seqlen", "32",
                       "--device", "cpu", "--out", str(tmp_path / "o")])
    assert run.returncode != 0
    assert "1 calibration micro-batches cannot be shared by 2 processes; use more --nsamples" in run.stderr
    assert "Traceback" not in run.stderr.split("error:")[0][-200:]


def test_two_streaming_gloo_processes_share_the_experts_and_equal_one(tmp_path, text_file):
    from conftest import byte_tokenizer
    from test_moe import moe_model

    model = tmp_path / "moe"
    moe_model("mixtral").save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib", str(text_file), "--nsamples", "8",
            "--seqlen", "64", "--microbatch", "2", "--device", "cpu", "--format", "dense"]
    one = torchrun(1, [*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, [*args, "--out", str(tmp_path / "two"), "--stream"])  # and streamed: experts fused block by block
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "llmprune.json").read_text())["model"]["streamed"] is True
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert set(a) == set(b) and any(".experts." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_gloo_processes_quantize_the_experts_as_one(tmp_path, text_file):
    """GPTQ on MoE experts under torchrun: each expert's statistics summed over the ranks in fp64, every rank rounds
    the same, the checkpoint packs each expert as one process packs it."""
    from conftest import byte_tokenizer
    from test_moe import moe_model

    model = tmp_path / "moe"
    moe_model("mixtral").save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    args = ["prune", str(model), "--method", "sparsegpt", "--pattern", "2:4", "--quantize", "w4a16", "--group-size", "16",
            "--calib", str(text_file), "--nsamples", "8", "--seqlen", "64", "--microbatch", "2", "--device", "cpu"]
    one = torchrun(1, [*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    from llmprune.checkpoint import read_state_dict

    a, b = (read_state_dict(tmp_path / out, "dense") for out in ("one", "two"))  # as stored: packed per expert
    packed = [k for k in a if ".experts." in k and k.endswith(".weight_packed")]
    assert set(a) == set(b) and len(packed) == 2 * 4 * 3
    for key in a:  # a Hessian summed in another order can move a weight across a rounding boundary
        moved = (a[key] != b[key]).float().mean().item()
        assert moved < 1e-3, (key, moved)
