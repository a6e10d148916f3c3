"""Every kind of llmprune output in environments of their own, without llmprune: the current transformers and
compressed-tensors from the registry, and the oldest transformers 5 we support (5.0.0). Each output either loads
with the weights and logits of llmprune.load, or stops with an error naming llmprune and how to load it.

The environments are installed apart (`pip install --target`) and run through eval/plain_load.py with `python -S`,
so llmprune is not importable there; LLMPRUNE_PLAIN_ENV_DIR / LLMPRUNE_OLD_ENV_DIR reuse existing installs.
"""
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune.cli.app import app

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "plain_load.py"
OLDEST = "5.0.0"


def install(target: Path, *requirements: str, deps: bool) -> Path:
    if not (target / "transformers").is_dir():
        command = [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), *requirements]
        done = subprocess.run(command + ([] if deps else ["--no-deps"]), capture_output=True, text=True, timeout=900)
        if done.returncode:
            pytest.skip(f"could not install {' '.join(requirements)} from the registry: {done.stderr.strip().splitlines()[-1:]}")
    return target


def newest_installable(*names: str) -> list[str]:
    """name==version for the newest releases pip would install beside this environment's torch: a release whose own
    requirements the registry cannot meet (transformers 5.25.0 needed kernels >= 0.19.1 before the registry had it)
    is not what a user gets, and installed without them it cannot load any model at all."""
    from importlib.metadata import PackageNotFoundError, version

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--upgrade", "--report",
                               str(report), *names], capture_output=True, text=True, timeout=900)
        if done.returncode:
            pytest.skip(f"pip could not resolve {' '.join(names)}: {done.stderr.strip().splitlines()[-1:]}")
        chosen = {row["metadata"]["name"].lower(): row["metadata"]["version"] for row in json.loads(report.read_text())["install"]}
    for name in names:
        if name.lower() not in chosen:
            try:
                chosen[name.lower()] = version(name)  # already the newest installable here
            except PackageNotFoundError:
                pytest.skip(f"pip resolved nothing for {name}")
    return [f"{name}=={v}" for name, v in chosen.items()]


@pytest.fixture(scope="module")
def current_env(tmp_path_factory):
    """The newest transformers and compressed-tensors a user can install (their other needs from this environment)."""
    given = os.environ.get("LLMPRUNE_PLAIN_ENV_DIR")
    target = Path(given) if given else tmp_path_factory.mktemp("current")
    if (target / "transformers").is_dir():
        return target
    return install(target, *newest_installable("transformers", "compressed-tensors", "loguru"), deps=False)


@pytest.fixture(scope="module")
def oldest_env(tmp_path_factory):
    """transformers 5.0.0 with what it needs (huggingface-hub 1.x, tokenizers 0.22), and the Hub's `kernels` package
    its own `hub-kernels` extra pins (< 0.11): this environment's kernels (0.19, which transformers 5.25 needs) would
    show through the path otherwise, and transformers 5.0.0 fails with it (and with 0.18) on every model, dense
    ones too ("Either a revision or a version must be specified"), which says nothing about our checkpoints."""
    given = os.environ.get("LLMPRUNE_OLD_ENV_DIR")
    return install(Path(given) if given else tmp_path_factory.mktemp("oldest"), f"transformers[hub-kernels]=={OLDEST}",
                   deps=True)


def plain_load(env: Path, directories, *, with_llmprune: bool = False) -> list[dict]:
    site = sysconfig.get_paths()["purelib"]
    command = [sys.executable, "-S", str(SCRIPT), *map(str, directories)]
    if with_llmprune:
        command[3:3] = ["--with-llmprune", str(REPO)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=env,
                          env={**os.environ, "PYTHONPATH": f"{env}{os.pathsep}{site}"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def digest(tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def expected(directory):
    model, _ = llmprune.load(str(directory))
    with torch.no_grad():
        logits = model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])).logits.float().flatten()
    return {k: digest(v) for k, v in model.state_dict().items()}, logits


def prune(source, text_file, out, *extra):
    result = CliRunner().invoke(app, [str(a) for a in ("prune", source, "--method", "sparsegpt", "--calib", text_file,
                                                       "--nsamples", 4, "--seqlen", 32, "--out", out, "--device", "cpu",
                                                       *extra)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Each kind of output: dense and compressed (bitmask, 2:4, bfloat16, streamed shards, mixture of experts)."""
    from conftest import byte_tokenizer, tiny_model
    from llmprune.data import BUNDLED
    from test_moe import moe_model

    root = tmp_path_factory.mktemp("outputs")
    text = root / "calib.txt"
    text.write_text(BUNDLED["wikitext2-valid"].read_text(encoding="utf-8")[:20000], encoding="utf-8")
    sources = {"llama": root / "llama", "bf16": root / "bf16", "mixtral": root / "mixtral"}
    tiny_model("llama").save_pretrained(sources["llama"], max_shard_size="40KB")
    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(sources["bf16"])
    moe_model("mixtral").save_pretrained(sources["mixtral"])
    for source in sources.values():
        byte_tokenizer().save_pretrained(source)
    kinds = {
        "dense": ("llama", "--format", "dense", "--pattern", "2:4"),
        "bitmask": ("llama", "--pattern", "unstructured", "--no-stream"),
        "2:4": ("llama", "--pattern", "2:4", "--no-stream"),
        "bf16 2:4": ("bf16", "--pattern", "2:4"),
        "streamed": ("llama", "--pattern", "2:4", "--stream"),
        "moe": ("mixtral", "--pattern", "2:4"),
        "moe dense": ("mixtral", "--pattern", "2:4", "--format", "dense"),
        # quantized (compressed-tensors' pack-quantized): W4A16 and W8A16, unpruned and 2:4
        "w4": ("llama", "--quantize", "w4a16", "--group-size", "32", "--sparsity", "0"),
        "w4 2:4": ("llama", "--quantize", "w4a16", "--group-size", "32", "--pattern", "2:4"),
        "w8 asym": ("llama", "--quantize", "w8a16", "--group-size", "0", "--asymmetric", "--sparsity", "0"),
        "bf16 w8 2:4": ("bf16", "--quantize", "w8a16", "--pattern", "2:4", "--group-size", "32"),
        "bf16 w4 asym 2:4": ("bf16", "--quantize", "w4a16", "--pattern", "2:4", "--group-size", "16", "--asymmetric"),
        # fused experts, stored one pack-quantized linear per expert projection
        "moe w4 2:4": ("mixtral", "--quantize", "w4a16", "--pattern", "2:4", "--group-size", "16"),
    }
    return {kind: prune(sources[source], text, root / kind.replace(" ", "-").replace(":", "of"), *extra)
            for kind, (source, *extra) in kinds.items()}


def check(rows, outputs, kinds, *, loads: set[str]):
    by_dir = {row["directory"]: row for row in rows}
    for kind in kinds:
        row = by_dir[str(outputs[kind])]
        if kind in loads:
            assert row["loaded"], (kind, row.get("error"))
            weights, logits = expected(outputs[kind])
            if kind in QUANTIZED + MOE_QUANTIZED:  # transformers keeps weight_scale and weight_shape beside the decompressed weight
                row["weights"] = {k: v for k, v in row["weights"].items() if k in weights}
            assert row["weights"] == weights, kind  # bit for bit
            torch.testing.assert_close(torch.tensor(row["logits"]), logits, rtol=1e-4, atol=1e-4)
        else:
            assert not row["loaded"], f"{kind} loaded without llmprune"
            error = row["error"]
            assert "llmprune" in error and "import llmprune" in error and "llmprune convert" in error, (kind, error)


KINDS = ["dense", "bitmask", "2:4", "bf16 2:4", "streamed", "moe", "moe dense"]
QUANTIZED = ["w4", "w4 2:4", "w8 asym", "bf16 w8 2:4", "bf16 w4 asym 2:4"]
MOE_QUANTIZED = ["moe w4 2:4"]


def test_current_release_without_llmprune(current_env, outputs):
    rows = plain_load(current_env, [outputs[k] for k in KINDS + QUANTIZED + MOE_QUANTIZED])
    assert rows and rows[0]["compressed_tensors"] is not None and rows[0]["llmprune"] is False
    check(rows, outputs, KINDS + QUANTIZED + MOE_QUANTIZED, loads={"dense", "moe dense", *QUANTIZED, *MOE_QUANTIZED})


def test_quantized_outputs_keep_their_zeros_and_scales(outputs):
    """The pack-quantized checkpoints llmprune.load reads: the 2:4 pattern holds in the dequantized weights, and
    every weight is on its grid (the codes read back give the weight)."""
    from llmprune.checkpoint import read_config

    for kind in QUANTIZED:
        model, _ = llmprune.load(str(outputs[kind]))
        qc = read_config(outputs[kind])["quantization_config"]
        assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"], kind
        W = model.model.layers[0].mlp.up_proj.weight
        if "2:4" in kind:
            assert ((W != 0).view(W.shape[0], -1, 4).sum(-1) <= 2).all(), kind
            assert qc["sparsity_config"]["sparsity_structure"] == "2:4"


def test_oldest_transformers_5_without_llmprune(oldest_env, outputs):
    kinds = ["dense", "bitmask", "2:4", "bf16 2:4", "streamed", "moe"]
    rows = plain_load(oldest_env, [outputs[k] for k in kinds])
    assert rows[0]["transformers"] == OLDEST
    check(rows, outputs, kinds, loads={"dense"})


def test_oldest_transformers_5_with_llmprune(oldest_env, outputs):
    kinds = ["bitmask", "2:4", "bf16 2:4", "streamed", "moe"]
    rows = plain_load(oldest_env, [outputs[k] for k in kinds], with_llmprune=True)
    assert rows[0]["transformers"] == OLDEST and rows[0]["llmprune"] is True
    check(rows, outputs, kinds, loads=set(kinds))
