"""`llmprune push` (hub.py) against a local fake of the Hub API: the dense layout lands on main (plain transformers
loads it), llmprune's compressed layout on a branch, each with a card that says which loads where; what was
uploaded loads back by Hub id, per branch, with llmprune.load, `llmprune eval` and transformers."""
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app

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


class FakeHub:
    """Records what HfApi would be asked, and keeps each branch's files as a commit would leave them."""

    def __init__(self):
        self.calls = []
        self.branches: dict[str, dict[str, bytes]] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs, operations))
        files = self.branches.setdefault(kwargs.get("revision") or "main", {})
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    def card(self, branch):
        return self.branches[branch]["README.md"].decode()

    def cache(self, root, repo_id):
        """A huggingface_hub cache holding every branch, for offline loading by Hub id."""
        repo = root / f"models--{repo_id.replace('/', '--')}"
        for k, (branch, files) in enumerate(sorted(self.branches.items())):
            commit = f"{k + 1:040x}"
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / branch).write_text(commit)
            for name, data in files.items():
                path = repo / "snapshots" / commit / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return root


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    import transformers.utils.hub  # noqa: F401  (annotates with HfApi at import: import it before the patch)

    fake = FakeHub()
    fake.tokens = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: (fake.tokens.append(token), fake)[1])
    return fake


def test_push_puts_dense_on_main_and_compressed_on_a_branch(tiny_model_dir, text_file, tmp_path, fake_hub):
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small", "--pattern", "2:4")
    result = run("push", small, "alice/tiny-2of4", "--private", "--token", "hf_SECRET123", "--json")
    assert result.exit_code == 0, result.output
    assert fake_hub.tokens == ["hf_SECRET123"] and "hf_SECRET123" not in result.output
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["create_repo", "create_commit", "create_branch", "create_commit"]
    assert fake_hub.calls[0][2]["private"] is True and fake_hub.calls[2][2]["branch"] == "compressed"
    uploads = json.loads(result.stdout)["uploads"]
    assert [(u["revision"], u["layout"]) for u in uploads] == [("main", "dense"), ("compressed", "llmprune")]
    main, branch = fake_hub.branches["main"], fake_hub.branches["compressed"]
    assert "model.safetensors" in main and "llmprune-model.safetensors" not in main
    assert "quantization_config" not in json.loads(main["config.json"])
    assert "llmprune-model.safetensors" in branch and json.loads(branch["config.json"])["quantization_config"]["quant_method"] == "llmprune"
    assert not any(name.startswith(".") for files in fake_hub.branches.values() for name in files)
    assert len(main["model.safetensors"]) > len(branch["llmprune-model.safetensors"])  # the branch really is smaller
    for name in ("main", "compressed"):
        card = fake_hub.card(name)
        assert card.startswith("---\n") and "tags:\n- llmprune\n- sparse\n- pruned" in card
        assert "sparsegpt" in card and "2:4" in card and "## Which branch loads where" in card
        assert "| `main` | dense safetensors" in card and "| `compressed` | llmprune's compressed `sparse-24-bitmask`" in card
        assert 'llmprune.load("alice/tiny-2of4@compressed")' in card and 'from_pretrained("alice/tiny-2of4")' in card
        assert "hf_SECRET123" not in card
    assert "library_name: transformers" in fake_hub.card("main")
    assert not list(tmp_path.glob(".small.push-*")), "converted copies are removed"
    assert "hf_SECRET123" not in (small / "llmprune.json").read_text()


def test_what_was_pushed_loads_back_by_hub_id(tiny_model_dir, text_file, tmp_path, fake_hub):
    """Each branch, by Hub id (resolved offline through huggingface_hub's cache): llmprune.load, `llmprune eval`, and
    transformers (plain on main; after `import llmprune` on the compressed branch), all with the same weights."""
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small", "--pattern", "unstructured")
    assert run("push", small, "alice/tiny-50", "--token", "t").exit_code == 0
    cache = fake_hub.cache(tmp_path / "hub", "alice/tiny-50")
    script = f"""
import json, sys, torch, llmprune
from transformers import AutoModelForCausalLM
reference = llmprune.load({str(small)!r})[0].state_dict()
same = lambda m: m.state_dict().keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in m.state_dict().items())
print(json.dumps({{
    "main": same(llmprune.load("alice/tiny-50")[0]),
    "branch": same(llmprune.load("alice/tiny-50@compressed")[0]),
    "revision": same(llmprune.load("alice/tiny-50", revision="compressed")[0]),
    "hf_main": same(AutoModelForCausalLM.from_pretrained("alice/tiny-50")),
    "hf_branch": same(AutoModelForCausalLM.from_pretrained("alice/tiny-50", revision="compressed")),
}}))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {k: True for k in ("main", "branch", "revision", "hf_main", "hf_branch")}
    evaluated = subprocess.run([sys.executable, "-m", "llmprune", "eval", "alice/tiny-50@compressed", "alice/tiny-50",
                                "--ppl", str(text_file), "--seqlen", "32", "--max-windows", "2", "--json"],
                               capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    models = json.loads(evaluated.stdout)["models"]
    assert len(models) == 2 and models[0]["ppl"] == models[1]["ppl"]


def test_push_one_layout(tiny_model_dir, text_file, tmp_path, fake_hub):
    dense = prune(tiny_model_dir("llama"), text_file, tmp_path / "dense", "--format", "dense")
    result = run("push", dense, "alice/x", "--layout", "compressed", "--revision", "v1", "--token", "t", "--json")
    assert result.exit_code == 0, result.output
    assert [(u["revision"], u["layout"]) for u in json.loads(result.stdout)["uploads"]] == [("v1", "llmprune")]
    assert list(fake_hub.branches) == ["v1"] and "llmprune-model.safetensors" in fake_hub.branches["v1"]
    result = run("push", dense, "alice/y", "--layout", "dense", "--token", "t", "--json")
    assert [(u["revision"], u["layout"]) for u in json.loads(result.stdout)["uploads"]] == [("main", "dense")]
    assert_user_error(run("push", dense, "alice/z", "--layout", "zip", "--token", "t"), "--layout", "both")
    assert_user_error(run("push", dense, "alice/z", "--compressed-branch", "main", "--token", "t"), "--compressed-branch")


def test_an_unpruned_model_gets_no_compressed_branch(tiny_model_dir, fake_hub):
    result = run("push", tiny_model_dir("llama"), "alice/dense", "--token", "t", "--json")
    assert result.exit_code == 0, result.output
    assert [(u["revision"], u["layout"]) for u in json.loads(result.stdout)["uploads"]] == [("main", "dense")]


def test_push_without_token(tiny_model_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert_user_error(run("push", tiny_model_dir("llama"), "alice/x"), "no Hugging Face token", "hf auth login")


@pytest.mark.parametrize("repo_id", ["justname", "a/b/c", "/x", "a/"])
def test_push_bad_repo_id(tiny_model_dir, repo_id):
    assert_user_error(run("push", tiny_model_dir("llama"), repo_id), "owner/name")


def test_a_failed_upload_is_one_line(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import huggingface_hub
    import transformers.utils.hub  # noqa: F401

    class Refusing(FakeHub):
        def create_commit(self, repo_id, operations, **kwargs):
            raise RuntimeError("403 Forbidden: write access denied\nmore lines")

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: Refusing())
    small = prune(tiny_model_dir("llama"), text_file, tmp_path / "small")
    assert_user_error(run("push", small, "alice/x", "--token", "t"), "upload to alice/x failed", "403 Forbidden")


def test_a_quantized_checkpoint_goes_up_as_it_is(tiny_model_dir, text_file, tmp_path, fake_hub):
    """pack-quantized loads with plain transformers and vLLM: one upload to main, no converted copies."""
    q = prune(tiny_model_dir("llama"), text_file, tmp_path / "q", "--pattern", "2:4", "--quantize", "w4a16", "--group-size", "32")
    result = run("push", q, "alice/tiny-24-w4", "--token", "t", "--json")
    assert result.exit_code == 0, result.output
    assert [(u["revision"], u["format"]) for u in json.loads(result.stdout)["uploads"]] == [("main", "pack-quantized")]
    main = fake_hub.branches["main"]
    assert json.loads(main["config.json"])["quantization_config"]["format"] == "pack-quantized"
    assert main["model.safetensors"] == (q / "model.safetensors").read_bytes()
    card = fake_hub.card("main")
    assert "library_name: transformers" in card and "- w4a16" in card and "w4a16 g32 symmetric" in card
    assert_user_error(run("push", q, "alice/x", "--layout", "dense", "--token", "t"), "quantized", "llmprune convert")
