"""Bad input anywhere in the CLI: one line naming the problem and the fix, exit code 2, no traceback, nothing written,
and never a destroyed input. These are the cases an audit of every command found to break that rule."""
import json
import shutil

import pytest

from test_cli import assert_user_error, prune_args, run


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture
def pruned(model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    assert run(*prune_args(model_dir, text_file, out, "--pattern", "2:4")).exit_code == 0
    return out


@pytest.mark.parametrize("extra,fragments", [
    (("--pattern", "3:7"), ("3:7", "q_proj has 64", "--ignore")),  # sparsegpt once met a partial group mid-run
    (("--method", "alps", "--pattern", "3:7"), ("3:7", "not a multiple of 7")),
    (("--method", "wanda", "--pattern", "1:128"), ("1:128",)),
    (("--microbatch", "0"), ("--microbatch", "got 0")),
    (("--microbatch", "-3"), ("--microbatch",)),
    (("--quantize", "w4a16", "--group-size", "16", "--quant-passes", "²"), ("quant_passes",)),
    (("--device", "mps"), ("mps", "cpu, cuda")),
    (("--device", "meta"), ("meta",)),
    (("--allocation", "owl", "--owl-m", "nan"), ("owl_m", "finite")),
    (("--method", "wanda", "--refine", "dsnot", "--dsnot-threshold", "nan"), ("dsnot_threshold", "finite")),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) and v and v[0].startswith("--") else "")
def test_prune_refuses_before_any_work(model_dir, text_file, tmp_path, extra, fragments):
    out = tmp_path / "out"
    assert_user_error(run(*prune_args(model_dir, text_file, out, *extra)), *fragments)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("variable,value", [("WORLD_SIZE", "abc"), ("LOCAL_WORLD_SIZE", "abc"), ("LOCAL_WORLD_SIZE", "0")])
def test_torchrun_variables_that_are_not_numbers(model_dir, text_file, tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert_user_error(run(*prune_args(model_dir, text_file, tmp_path / "out")), variable, repr(value))


def test_a_stray_rank_without_a_job_still_reports(model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    result = run(*prune_args(model_dir, text_file, tmp_path / "out"))
    assert result.exit_code == 0 and "saved to" in result.stdout


def test_empty_model_and_empty_out(model_dir, text_file, tmp_path):
    assert_user_error(run(*prune_args("", text_file, tmp_path / "out")), "model is empty")
    assert_user_error(run(*prune_args(model_dir, text_file, "")), "--out is empty")


def test_out_never_replaces_the_model_it_reads(model_dir, text_file):
    before = sorted(p.name for p in model_dir.iterdir())
    assert_user_error(run(*prune_args(model_dir, text_file, model_dir, "--overwrite")), "is the input")
    assert_user_error(run(*prune_args(model_dir, text_file, model_dir.parent, "--overwrite")), "holds the input")
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_overwrite_replaces_checkpoints_only(model_dir, text_file, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("months of work")
    assert_user_error(run(*prune_args(model_dir, text_file, notes, "--overwrite")), "no checkpoint")
    assert (notes / "thesis.txt").read_text() == "months of work"
    (tmp_path / "empty").mkdir()
    assert run(*prune_args(model_dir, text_file, tmp_path / "empty", "--overwrite")).exit_code == 0
    assert run(*prune_args(model_dir, text_file, tmp_path / "empty", "--overwrite")).exit_code == 0  # now a checkpoint


def test_recipe_with_an_unquoted_pattern(model_dir, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sparsegpt\npattern: 2:4\n")  # YAML 1.1: the number 124
    assert_user_error(run(*prune_args(model_dir, text_file, tmp_path / "out", "--recipe", recipe)), "quote it")


def test_calibration_path_that_is_a_directory(model_dir, tmp_path):
    result = run("prune", model_dir, "--calib", tmp_path, "--nsamples", 4, "--seqlen", 32, "--out", tmp_path / "o",
                 "--device", "cpu")
    assert_user_error(result, "is a directory")


def test_convert_never_deletes_its_input(pruned, tmp_path):
    holder = tmp_path / "holder"
    shutil.copytree(pruned, holder / "sub")
    assert_user_error(run("convert", holder / "sub", "--format", "dense", "--out", holder, "--overwrite"), "holds the input")
    assert (holder / "sub" / "config.json").is_file()
    assert_user_error(run("convert", pruned, "--format", "dense", "--out", pruned, "--overwrite"), "is the input")


def test_convert_of_a_quantized_checkpoint_says_it_expands_it(model_dir, text_file, tmp_path):
    q = tmp_path / "q"
    assert run(*prune_args(model_dir, text_file, q, "--pattern", "2:4", "--quantize", "w4a16", "--group-size", "16")).exit_code == 0
    result = run("convert", q, "--format", "dense", "--out", tmp_path / "d")
    assert result.exit_code == 0 and "de-quantized" in result.stderr
    assert json.loads((tmp_path / "d" / "llmprune.json").read_text())["dequantized_from"].startswith("w4a16 g16")
    info = run("info", tmp_path / "d")
    assert info.exit_code == 0 and "stored de-quantized" in info.stdout


def test_info_bad_plot_names_and_damaged_directories(pruned, tmp_path):
    assert_user_error(run("info", pruned, "--plot", tmp_path / "x.xyz"), ".xyz", ".png")
    assert_user_error(run("info", pruned, "--plot", tmp_path), "without an extension")
    assert not list(tmp_path.glob("*.png"))
    damaged = tmp_path / "damaged"
    shutil.copytree(pruned, damaged)
    report = json.loads((damaged / "llmprune.json").read_text())
    (damaged / "llmprune.json").write_text(json.dumps({**report, "recipe": 5}))
    assert_user_error(run("info", damaged), "'recipe'", "delete it")
    (damaged / "llmprune.json").write_text("[1, 2]")
    assert_user_error(run("info", damaged), "not a dict")
    (damaged / "llmprune.json").unlink()
    (damaged / "config.json").unlink()
    assert_user_error(run("info", damaged), "no config.json")


@pytest.mark.parametrize("extra,fragment", [
    (("--ppl", "TEXT", "--start", "-5"), "--start"),
    (("--tasks", ",,"), "names no task"),
    (("--tasks", "wikitext_mc", "--num-fewshot", "-1"), "--num-fewshot"),
], ids=["negative start", "empty tasks", "negative fewshot"])
def test_eval_refuses_nonsense_counts(pruned, text_file, extra, fragment):
    extra = tuple(str(text_file) if a == "TEXT" else a for a in extra)
    assert_user_error(run("eval", pruned, "--seqlen", 32, "--device", "cpu", *extra), fragment)


@pytest.mark.parametrize("extra,fragment", [
    (("--repeats", "0"), "--repeats"),
    (("--prompt", "1000"), "positions"),
    (("--decode-tokens", "100000"), "positions"),
], ids=["no repeats", "prompt beyond positions", "decode beyond positions"])
def test_bench_refuses_impossible_runs(pruned, extra, fragment):
    assert_user_error(run("bench", pruned, "--device", "cpu", *extra), fragment)


def test_flags_the_run_does_not_use_are_named(model_dir, tmp_path):
    result = run("prune", model_dir, "--method", "magnitude", "--calib", tmp_path / "absent.txt", "--group-size", "16",
                 "--owl-m", "3", "--dsnot-cycles", "5", "--device", "cpu", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    for flag in ("--group-size has no effect without --quantize", "--owl-m has no effect without --allocation owl",
                 "--dsnot-cycles has no effect without --refine dsnot", "--calib has no effect"):
        assert flag in result.stderr, result.stderr


def test_local_model_directories_missing_a_part(model_dir, text_file, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for file in no_tokenizer.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab")):
            file.unlink()
    assert_user_error(run(*prune_args(no_tokenizer, text_file, tmp_path / "a")), "no tokenizer files")
    no_type = tmp_path / "no-type"
    shutil.copytree(model_dir, no_type)
    (no_type / "config.json").write_text("{}")
    assert_user_error(run(*prune_args(no_type, text_file, tmp_path / "b")), "no model_type")
