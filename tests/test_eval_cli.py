"""`llmprune eval`: divergence from a baseline, lm-eval zero-shot through the in-memory model, recording, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import byte_tokenizer, plan_for, tiny_model
from llmprune.cli.app import app
from llmprune.evaluate import perplexity

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'llmprune[eval]')")

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tokens(n=600, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_kl_of_a_model_against_itself_is_zero():
    model = tiny_model("llama")
    out = perplexity(model, tokens(), seqlen=64, baseline=model)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1_agreement"] == 1.0
    assert out["baseline_ppl"] == pytest.approx(out["ppl"], rel=1e-12)


def test_kl_against_a_pruned_copy_is_positive():
    from llmprune import calibrate
    from llmprune.masks import Pattern

    dense, pruned = tiny_model("qwen2"), tiny_model("qwen2")
    calibrate.prune_model(pruned, None, plan_for(pruned, method="magnitude", sparsity=0.5))
    out = perplexity(pruned, tokens(), seqlen=64, baseline=dense)
    assert out["kl"] > 1e-4
    assert 0.0 <= out["top1_agreement"] < 1.0
    assert out["baseline_ppl"] == pytest.approx(perplexity(dense, tokens(), seqlen=64)["ppl"], rel=1e-9)


def test_kl_matches_a_direct_computation():
    dense, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = tokens(128)[:, :128].reshape(2, 64)
    with torch.no_grad():
        p = torch.log_softmax(dense(ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(other(ids).logits[:, :-1].double(), -1)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    out = perplexity(other, ids.reshape(1, -1), seqlen=64, baseline=dense)
    assert out["kl"] == pytest.approx(direct, rel=1e-4)


# ---- lm-eval on a tiny local multiple-choice task --------------------------------------------------------

QUESTIONS = [
    ("the cat sat on the", ["mat", "sky", "idea", "seven"], 0),
    ("one two three", ["four", "blue", "house", "run"], 0),
    ("water is", ["wet", "loud", "square", "late"], 0),
    ("the sun rises in the", ["west", "east", "box", "song"], 1),
    ("a b c d", ["q", "e", "z", "m"], 1),
    ("red green", ["blue", "car", "sad", "nine"], 0),
    ("monday tuesday", ["friday", "wednesday", "april", "cold"], 1),
    ("up and", ["down", "left", "tree", "fast"], 0),
    ("salt and", ["pepper", "iron", "wood", "glass"], 0),
    ("north south east", ["west", "up", "red", "old"], 0),
    ("hello", ["world", "seven", "ice", "pan"], 0),
    ("bread and", ["butter", "stone", "cloud", "wire"], 0),
]


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": l}) + "\n" for q, c, l in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


@pytest.fixture
def pruned_dir(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    result = run("prune", tiny_model_dir("llama"), "--method", "wanda", "--calib", text_file, "--nsamples", 4,
                 "--seqlen", 32, "--out", out, "--device", "cpu", "--format", "dense")  # lm-eval reads dense only
    assert result.exit_code == 0, result.output
    return out


def lm_eval_cli(model_dir, task_dir, tmp_path):
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir}",
           "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(out.rglob("results*.json"))
    assert files, list(out.rglob("*"))
    return json.loads(files[-1].read_text())["results"]["tiny_mc"]


def test_zero_shot_equals_lm_evals_own_cli_and_is_recorded(pruned_dir, task_dir, tmp_path):
    result = run("eval", pruned_dir, "--tasks", "tiny_mc", "--tasks-dir", task_dir, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    theirs = lm_eval_cli(pruned_dir, task_dir, tmp_path)
    scores = ours["models"][0]["tasks"]["tiny_mc"]
    assert scores["acc"] == theirs["acc,none"]
    assert scores["acc_norm"] == theirs["acc_norm,none"]
    assert scores["samples"] == len(QUESTIONS) and scores["version"] is not None
    assert ours["lm_eval"] == lm_eval.__version__ if hasattr(lm_eval, "__version__") else ours["lm_eval"]
    recorded = json.loads((pruned_dir / "llmprune.json").read_text())["eval"]
    assert recorded["tasks"]["tiny_mc"]["acc"] == scores["acc"]
    assert recorded["lm_eval"] == ours["lm_eval"]


def test_baseline_table_with_deltas(pruned_dir, tiny_model_dir, task_dir, text_file):
    dense = tiny_model_dir("llama")
    result = run("eval", pruned_dir, "--baseline", dense, "--ppl", text_file, "--seqlen", 64, "--max-windows", 3,
                 "--tasks", "tiny_mc", "--tasks-dir", task_dir, "--limit", 5, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    base, model = out["models"]
    assert base["role"] == "baseline" and model["role"] == "model"
    assert out["seqlen"] == 64 and out["windows"] == 3 and out["limit"] == 5
    assert model["kl"] > 0 and 0 <= model["top1_agreement"] <= 1
    assert base["ppl"] > 0 and model["ppl"] > 0
    assert base["tasks"]["tiny_mc"]["samples"] == 5
    recorded = json.loads((pruned_dir / "llmprune.json").read_text())["eval"]
    assert recorded["divergence"][0]["kl"] == model["kl"] and recorded["perplexity"][0]["seqlen"] == 64
    table = run("eval", pruned_dir, "--baseline", dense, "--ppl", text_file, "--seqlen", 64, "--max-windows", 3,
                "--device", "cpu", "--no-record")
    assert table.exit_code == 0, table.output
    assert "(baseline)" in table.output and "KL from baseline" in table.output and "seqlen 64" in table.output


def test_results_accumulate_in_llmprune_json(pruned_dir, text_file):
    for seqlen in (32, 64, 64):
        assert run("eval", pruned_dir, "--ppl", text_file, "--seqlen", seqlen, "--max-windows", 2, "--device", "cpu",
                   "--json").exit_code == 0
    entries = json.loads((pruned_dir / "llmprune.json").read_text())["eval"]["perplexity"]
    assert sorted(e["seqlen"] for e in entries) == [32, 64]


# ---- bad input ---------------------------------------------------------------------------------------------


def test_unknown_task_names_close_matches(tiny_model_dir):
    assert_user_error(run("eval", tiny_model_dir("llama"), "--tasks", "arc_esy", "--device", "cpu"),
                      "unknown lm-eval task 'arc_esy'", "arc_easy")


def test_task_needing_the_hub_offline(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "HF_HOME": str(tmp_path / "hfhome")}
    done = subprocess.run([sys.executable, "-m", "llmprune", "eval", str(tiny_model_dir("llama")), "--tasks", "arc_easy",
                           "--limit", "2", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--tasks-dir" in errors[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("content,fragment", [(b"", "is empty"), (b"\x00\x01binary", "looks binary")])
def test_bad_perplexity_files(tiny_model_dir, tmp_path, content, fragment):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    assert_user_error(run("eval", tiny_model_dir("llama"), "--ppl", path, "--device", "cpu"), fragment)


def test_seqlen_past_the_models_positions(tiny_model_dir, text_file):
    assert_user_error(run("eval", tiny_model_dir("llama"), "--ppl", text_file, "--seqlen", 4096, "--device", "cpu"),
                      "longer than the model's 256 positions", "--seqlen 256")


def test_baseline_with_another_tokenizer(tiny_model_dir, tmp_path, text_file):
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    assert_user_error(run("eval", tiny_model_dir("llama"), "--baseline", other, "--ppl", text_file, "--seqlen", 64,
                          "--device", "cpu"), "different tokenizer", "--baseline")


def test_nothing_to_evaluate(tiny_model_dir):
    assert_user_error(run("eval", tiny_model_dir("llama"), "--ppl", "none", "--device", "cpu"), "nothing to evaluate")


def test_wikitext_mc_example_task_builds():
    """The shipped offline example task: deterministic, four distinct choices, the right one among them."""
    import importlib.util
    from pathlib import Path

    from llmprune.data import BUNDLED

    spec = importlib.util.spec_from_file_location(
        "wikitext_mc_data", Path(__file__).resolve().parents[1] / "eval/tasks/wikitext_mc/wikitext_mc_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = BUNDLED["wikitext2-valid"].read_text(encoding="utf-8")
    docs = module.build(text)
    assert len(docs) == 1000 and docs == module.build(text)
    for doc in docs[:50]:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
        assert len(doc["context"].split()) == 10


def test_prune_never_imports_lm_eval():
    code = ("import sys; from typer.testing import CliRunner; from llmprune.cli.app import app; "
            "r = CliRunner().invoke(app, ['prune', '--help']); assert r.exit_code == 0; "
            "import llmprune.api, llmprune.calibrate, llmprune.checkpoint; print('lm_eval' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
