import math

import pytest
import torch

from conftest import tiny_model
from llmprune.errors import LlmpruneError
from llmprune.evaluate import perplexity


def direct_perplexity(model, tokens, seqlen, windows, start=0):
    """The SparseGPT protocol written out with transformers' own loss, window by window."""
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            x = tokens[:, start + i * seqlen: start + (i + 1) * seqlen]
            nlls.append(model(x, labels=x).loss.double() * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (windows * seqlen))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_direct_computation(batch_size):
    model = tiny_model("llama")
    tokens = torch.randint(0, 256, (1, 1000), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, seqlen=64, max_windows=7, start=30, batch_size=batch_size)
    assert result["windows"] == 7 and result["seqlen"] == 64
    assert result["ppl"] == pytest.approx(direct_perplexity(model, tokens, 64, 7, start=30), rel=1e-5)


def test_all_windows_by_default():
    tokens = torch.randint(0, 256, (1, 200))
    assert perplexity(tiny_model("gpt2"), tokens, seqlen=64)["windows"] == 3


def test_too_few_tokens():
    with pytest.raises(LlmpruneError, match="fewer than one window"):
        perplexity(tiny_model("llama"), torch.zeros(1, 10, dtype=torch.long), seqlen=64)
