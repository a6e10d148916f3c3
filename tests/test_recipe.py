import json

import pytest
import torch
from typer.testing import CliRunner

from llmprune.cli import app
from llmprune.errors import LlmpruneError
from llmprune.recipe import Recipe, load_recipe, shipped_recipes

runner = CliRunner()
SHIPPED = ["sparsegpt-2of4", "wanda-unstructured-50", "sparsegpt-4of8", "owl-wanda-70", "owl-dsnot-70", "alps-unstructured-70", "admm-unstructured-70",
           "alps-2of4", "owl-alps-70", "sparsegpt-2of4-w4a16", "sparsegpt-50-w4a16"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_round_trip_is_identical(tmp_path):
    recipe = Recipe.create(method="wanda", sparsity=0.7, allocation="owl", refine="dsnot", dsnot_cycles=20,
                           ignore=["lm_head"], targets=[r"\.mlp\."], overrides={"mlp.down_proj": 0.6}, seed=3)
    path = tmp_path / "r.yaml"
    recipe.save(path, "what it is for")
    loaded = load_recipe(path)
    assert loaded == recipe
    loaded.save(tmp_path / "again.yaml", "what it is for")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()
    assert path.read_text().startswith("# what it is for\n")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_by_name_and_say_what_they_are_for(name):
    assert name in shipped_recipes()
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert shipped_recipes()[name].read_text().startswith("# ")


def test_overrides_first_match_wins():
    recipe = Recipe.create(sparsity=0.7, overrides={r"down_proj": 0.6, r"mlp": 0.5})
    assert recipe.sparsity_override("model.layers.3.mlp.down_proj") == 0.6
    assert recipe.sparsity_override("model.layers.3.mlp.up_proj") == 0.5
    assert recipe.sparsity_override("model.layers.3.self_attn.q_proj") is None


@pytest.mark.parametrize("fields,actorder", [
    ({"sparsity": 0.0}, True),  # GPTQ alone: act order by default
    ({"sparsity": 0.5}, False), ({"pattern": "2:4", "sparsity": 0.5}, False),
    ({"sparsity": 0.0, "overrides": ((r"mlp", 0.5),)}, False),  # something is pruned
    ({"sparsity": 0.0, "actorder": False}, False), ({"sparsity": 0.5, "actorder": "on"}, True),
])
def test_act_order_is_on_for_gptq_alone_unless_asked_otherwise(fields, actorder):
    recipe = Recipe.create(quantize="w4a16", **fields)
    assert recipe.quant_scheme.actorder is actorder
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert Recipe.create(quantize="w4a16", observer="mse", **fields).quant_scheme.observer == "mse"


@pytest.mark.parametrize("fields,passes", [
    ({"sparsity": 0.0}, 0),  # GPTQ alone: no descent by default
    ({"sparsity": 0.5}, 6), ({"pattern": "2:4", "sparsity": 0.5}, 6),
    ({"sparsity": 0.0, "overrides": ((r"mlp", 0.5),)}, 6),
    ({"sparsity": 0.0, "quant_passes": 2}, 2), ({"sparsity": 0.5, "quant_passes": "0"}, 0),
])
def test_descent_passes_after_pruning_unless_asked_otherwise(fields, passes):
    recipe = Recipe.create(quantize="w4a16", **fields)
    assert recipe.quant_scheme.passes == passes
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_cli_flags_override_recipe_fields():
    recipe = load_recipe("owl-wanda-70").override(sparsity=0.6, nsamples=8)
    assert (recipe.method, recipe.sparsity, recipe.nsamples, recipe.allocation) == ("wanda", 0.6, 8, "owl")
    assert load_recipe("sparsegpt-2of4").override(pattern="4:8").sparsity == 0.5
    assert load_recipe("wanda-unstructured-50").override(pattern="2:4").pattern == "2:4"


@pytest.mark.parametrize("text,fragments", [
    ("metod: wanda\n", ["unknown recipe field", "'metod' (did you mean 'method'?)"]),
    ("sparsity: high\n", ["sparsity must be a number", "'high'"]),
    ("nsamples: 1.5\n", ["nsamples must be an integer", "1.5"]),
    ("sparsity: 1.2\n", ["outside [0, 1)"]),
    ("pattern: '2:4'\nallocation: owl\n", ["allocation: owl", "2:4", "--pattern unstructured"]),
    ("refine: dsnoot\n", ["refine: unknown value 'dsnoot'", "dsnot"]),
    ("ignore: ['(']\n", ["ignore: '(' is not a valid regular expression"]),
    ("overrides: {mlp: 2}\n", ["overrides", "outside [0, 1)"]),
    ("overrides: [1, 2]\n", ["overrides must map"]),
    ("method: [1\n", ["not valid YAML"]),
    ("- a\n- b\n", ["a recipe is a mapping"]),
    ("dsnot_cycles: 0\n", ["dsnot_cycles must be at least 1"]),
    ("method: alps\nalps_budget: rows\n", ["alps_budget: unknown value 'rows'", "layer"]),
    ("method: wanda\nalps_budget: row\n", ["alps_budget: row applies to --method alps or admm only"]),
    ("version: 9\n", ["recipe version 9"]),
    ("quantize: w4a16\nactorder: maybe\n", ["actorder: unknown value 'maybe'", "auto, on, off"]),
    ("quantize: w4a16\nobserver: max\n", ["observer: unknown value 'max'", "minmax, mse"]),
    ("quantize: w4a16\nquant_passes: some\n", ["quant_passes must be auto or a whole number", "got 'some'"]),
    ("quantize: w4a16\nquant_passes: -1\n", ["quant_passes must be auto or a whole number", "got '-1'"]),
])
def test_bad_recipes_give_one_line_errors(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LlmpruneError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    result = run("prune", "smollm2", "--recipe", path, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_name_lists_the_shipped_ones(tmp_path):
    result = run("prune", "smollm2", "--recipe", "owl-70", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "owl-dsnot-70" in result.stderr


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def masks_of(directory):
    from llmprune import load

    model = load(str(directory))[0]
    return {n: (p == 0) for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_owl_dsnot_run_reproduces_bit_for_bit_from_its_recipe(model_dir, text_file, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    result = run("prune", model_dir, "--method", "wanda", "--sparsity", 0.7, "--allocation", "owl", "--refine", "dsnot",
                 "--owl-lambda", 0.05, "--dsnot-cycles", 20, "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
                 "--out", first, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    blocks = report["allocation"]["block_sparsity"]
    assert len(blocks) == 2 and all(abs(s - 0.7) <= 0.05 + 1e-9 for s in blocks)
    assert sum(blocks) / 2 == pytest.approx(0.7)
    for row in report["linears"]:  # every linear at its block's sparsity (floor per row, as Wanda compares rows)
        block = int(row["name"].split(".")[2])
        assert row["target"] == blocks[block]
        assert abs(row["sparsity"] - blocks[block]) < 1 / row["shape"][1] + 1e-9
        assert row["refine"]["error_after"] <= row["refine"]["error_before"]
    saved = load_recipe(first / "recipe.yaml")
    assert (saved.allocation, saved.refine, saved.owl_lambda, saved.dsnot_cycles) == ("owl", "dsnot", 0.05, 20)
    result = run("prune", model_dir, "--recipe", first / "recipe.yaml", "--out", second, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    a, b = masks_of(first), masks_of(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_targets_and_overrides_reach_the_linears(model_dir, text_file, tmp_path):
    result = run("prune", model_dir, "--method", "magnitude", "--target", r"\.mlp\.", "--out", tmp_path / "o",
                 "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads(result.stdout)["linears"]]
    assert names and all(".mlp." in n for n in names)
    recipe = Recipe.create(method="magnitude", sparsity=0.5, overrides={"down_proj": 0.25})
    path = tmp_path / "r.yaml"
    recipe.save(path)
    result = run("prune", model_dir, "--recipe", path, "--out", tmp_path / "p", "--json", "--device", "cpu")
    rows = {row["name"]: row for row in json.loads(result.stdout)["linears"]}
    assert rows["model.layers.0.mlp.down_proj"]["sparsity"] == 0.25
    assert rows["model.layers.0.mlp.up_proj"]["sparsity"] == 0.5


def test_owl_with_nm_from_the_cli_is_an_error(model_dir, tmp_path):
    result = run("prune", model_dir, "--pattern", "2:4", "--allocation", "owl", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "allocation: owl" in result.stderr


def test_alps_row_budget_from_the_cli_reaches_every_linear(model_dir, text_file, tmp_path):
    result = run("prune", model_dir, "--method", "alps", "--sparsity", "0.6", "--alps-budget", "row", "--calib",
                 text_file, "--nsamples", "4", "--seqlen", "32", "--out", tmp_path / "o", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert load_recipe(tmp_path / "o" / "recipe.yaml").alps_budget == "row"
    for name, pruned in masks_of(tmp_path / "o").items():
        per_row = pruned.sum(1)
        assert (per_row == int(0.6 * pruned.shape[1])).all(), name


def test_the_budget_option_reaches_both_admm_solvers_only():
    assert Recipe.create(method="admm", alps_budget="row").solver_options == {"budget": "row"}
    assert Recipe.create(method="alps").solver_options == {"budget": "layer"}
    assert Recipe.create(method="sparsegpt").solver_options == {}
