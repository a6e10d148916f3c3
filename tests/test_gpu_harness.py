"""eval/gpu_prune_check.py, the script a lent GPU runs, dry-run on the CPU against itself: a break in it would cost
device time that sessions rarely have, so its cases, timing and CLI runs are run here, and must agree exactly."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "gpu_prune_check.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("gpu_prune_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_cases_agree_with_themselves(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--devices", "cpu,cpu", "--work", str(tmp_path / "work"),
                           "--cases", "w8a16,owl", "--no-cli", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["api"]
    assert {(r["method"], r.get("quantize"), r.get("allocation")) for r in rows} == {
        ("alps", "w8a16", None), ("wanda", None, "owl"), ("alps", None, "owl")}
    for row in rows:
        assert row["mask_agreement"] == row["exact_agreement"] == 1.0, row


def test_compare_reports_a_broken_pattern(harness):
    import torch

    kept = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0]])
    broken = kept.clone()
    broken[0, 1] = 5.0  # three kept in the first group of four
    row = harness.compare({"w": kept}, {"w": broken}, "2:4")
    assert row["pattern_holds"] is False and row["mask_agreement"] == 7 / 8 and row["exact_agreement"] == 7 / 8
    assert harness.compare({"w": kept}, {"w": kept}, "2:4")["pattern_holds"] is True


def test_timing_and_cli_runs(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "TIMING_MODEL", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                                      num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(harness, "TIMING_CASES", harness.TIMING_CASES[:2])
    rows = harness.timing(tmp_path, "cpu")
    assert [r["method"] for r in rows] == ["sparsegpt", "alps"] and len(rows[1]["s"]) == 2 and rows[1]["vs_sparsegpt"] > 0

    model_dir = tmp_path / "model"
    harness.write_model(model_dir)
    rows = {r["run"]: r for r in harness.cli_runs(tmp_path, model_dir, "cpu", "cpu")}
    assert all(r["rc"] == 0 for r in rows.values()), [r.get("stderr") for r in rows.values()]
    for name in ("in memory", "stream", "torchrun 1 process", "quantized", "quantized stream"):
        assert rows[name]["exact_agreement"] == 1.0 and rows[name]["pattern_holds"], rows[name]
