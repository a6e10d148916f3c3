import json

import pytest
import torch
from typer.testing import CliRunner

from llmprune.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(("INFO ", "WARNING ", " "))]  # progress may precede
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def prune_args(model_dir, text_file, out, *extra):
    return ("prune", model_dir, "--calib", text_file, "--nsamples", 4, "--seqlen", 32, "--out", out, "--device", "cpu", *extra)


def test_prune_and_eval_end_to_end(model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    result = run(*prune_args(model_dir, text_file, out, "--method", "wanda", "--pattern", "2:4", "--json",
                             "--format", "dense"))  # dense: loads with plain transformers
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sparsity"] == pytest.approx(0.5) and report["recipe"]["pattern"] == "2:4"
    assert report["output"] == str(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.layers[1].mlp.down_proj.weight == 0).float().mean()) == 0.5
    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["recipe"]["method"] == "wanda" and len(saved["linears"]) == 14
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []

    result = run("eval", out, "--ppl", text_file, "--seqlen", 64, "--max-windows", 3, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["windows"] == 3 and data["seqlen"] == 64 and data["models"][0]["ppl"] > 1


def test_human_summary(model_dir, text_file, tmp_path):
    result = run(*prune_args(model_dir, text_file, tmp_path / "o", "--method", "sparsegpt"))
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.stdout and "saved to" in result.stdout


def test_magnitude_needs_no_calibration_text(model_dir, tmp_path):
    result = run("prune", model_dir, "--method", "magnitude", "--calib", "/no/file.txt", "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,fragments", [
    (("--method", "obs"), ("unknown method 'obs'", "sparsegpt")),
    (("--pattern", "5:4"), ("5:4", "0 < N < M")),
    (("--pattern", "0:4"), ("0:4",)),
    (("--pattern", "2:x"), ("2:x", "N:M")),
    (("--sparsity", "1.0"), ("outside [0, 1)",)),
    (("--sparsity", "-0.2"), ("outside [0, 1)",)),
    (("--pattern", "2:4", "--sparsity", "0.7"), ("implies 0.5", "1 - 2/4")),
    (("--ignore", "("), ("not a valid regular expression",)),
    (("--ignore", "."), ("match them all", "loosen --ignore")),
    (("--device", "tpu9"), ("unknown device",)),
])
def test_bad_options(model_dir, text_file, tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_user_error(run(*prune_args(model_dir, text_file, out, *args)), *fragments)
    assert not out.exists()


def test_bad_models(tmp_path, text_file):
    out = tmp_path / "out"
    assert_user_error(run(*prune_args(tmp_path / "missing", text_file, out)), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run(*prune_args(empty, text_file, out)), "not a model")
    assert not out.exists()


@pytest.mark.parametrize("content,fragments", [
    (b"", ("is empty",)),
    (b"\x00\x00\x00\x01 binary", ("looks binary",)),
    (b"too short", ("has 9 tokens", "use --seqlen 8")),
])
def test_bad_calibration_files(model_dir, tmp_path, content, fragments):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    out = tmp_path / "out"
    assert_user_error(run(*prune_args(model_dir, calib, out)), *fragments)
    assert not out.exists()


def test_existing_output_is_refused_unless_overwrite(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier checkpoint there (--overwrite replaces only checkpoints)
    (out / "keep.txt").write_text("mine")
    assert_user_error(run(*prune_args(model_dir, text_file, out)), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run(*prune_args(model_dir, text_file, out, "--overwrite", "--method", "magnitude"))
    assert result.exit_code == 0 and (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_ctrl_c_during_pruning_leaves_nothing(model_dir, text_file, tmp_path, monkeypatch):
    from llmprune.calibrate import loop, pruner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pruner, "apply", interrupted)
    monkeypatch.setattr(loop, "apply", interrupted)
    out = tmp_path / "out"
    assert_user_error(run(*prune_args(model_dir, text_file, out)), "interrupted")
    assert list(tmp_path.iterdir()) == [text_file] or not out.exists()
    assert not out.exists()


def test_ctrl_c_while_saving_leaves_nothing(model_dir, text_file, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def interrupted(self, directory, *args, **kwargs):
        (torch.zeros(1), open(f"{directory}/half-written", "w").close())
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    # a run shorter than --checkpoint-every kept no state: nothing is left behind
    assert_user_error(run(*prune_args(model_dir, text_file, out, "--method", "magnitude")), "interrupted while saving",
                      "nothing was written", "run the command again")
    assert list(work.iterdir()) == []
    assert_user_error(run(*prune_args(model_dir, text_file, out, "--method", "magnitude", "--checkpoint-every", "0")),
                      "interrupted while saving", "every pruned block is kept", "--resume")
    assert [p.name for p in work.iterdir()] == ["out.partial"]  # no half-written output; the pruned blocks are kept
    monkeypatch.undo()
    result = run(*prune_args(model_dir, text_file, out, "--method", "magnitude", "--resume"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_eval_bad_input(tmp_path, model_dir):
    assert_user_error(run("eval", tmp_path / "nothing"), "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert_user_error(run("eval", model_dir, "--ppl", short, "--seqlen", 64, "--device", "cpu"), "fewer than one window")


def test_help_has_examples():
    result = run("prune", "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout and "--pattern" in result.stdout


def test_a_full_disk_while_saving_is_one_line(model_dir, text_file, tmp_path, monkeypatch):
    import errno

    from transformers import modeling_utils

    from llmprune import checkpoint

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    # both ways tensors reach the disk: our writer and transformers' save_pretrained (the direct compressed save)
    monkeypatch.setattr(checkpoint, "write_tensors", full)
    monkeypatch.setattr(modeling_utils, "safe_save_file", lambda tensors, filename, **kw: full(filename))
    work = tmp_path / "work"
    work.mkdir()
    for fmt in ("compressed", "dense", "compressed-tensors"):
        result = run(*prune_args(model_dir, text_file, work / fmt, "--method", "magnitude", "--format", fmt))
        assert_user_error(result, "no space left on the device", "--out elsewhere")
        assert not (work / fmt).exists(), fmt
