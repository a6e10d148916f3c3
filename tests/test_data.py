import json
import random

import pytest
import torch

from conftest import byte_tokenizer
from llmprune.data import BUNDLED, calibration_windows, eval_tokens
from llmprune.errors import LlmpruneError


def test_windows_follow_sparsegpt_sampling(text_file):
    tok = byte_tokenizer()
    stream = tok(text_file.read_text(), return_tensors="pt").input_ids
    got = calibration_windows(str(text_file), tok, nsamples=5, seqlen=64, seed=3)
    random.seed(3)
    for row in got:
        start = random.randint(0, stream.shape[1] - 64 - 1)
        assert torch.equal(row, stream[0, start:start + 64])
    assert torch.equal(got, calibration_windows(str(text_file), tok, nsamples=5, seqlen=64, seed=3))
    assert not torch.equal(got, calibration_windows(str(text_file), tok, nsamples=5, seqlen=64, seed=4))


def test_jsonl_text_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 5}) for i in range(4)) + "\n")
    windows = calibration_windows(str(path), byte_tokenizer(), nsamples=3, seqlen=32, seed=0)
    assert windows.shape == (3, 32)


def test_bundled_text_is_available_offline():
    assert BUNDLED["wikitext2-valid"].stat().st_size > 1_000_000
    tokens = eval_tokens("wikitext2-valid", byte_tokenizer(), seqlen=128)
    assert tokens.shape[1] > 1_000_000


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"   \n\n ", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"\xff\xfe\xfa text", "not UTF-8"),
])
def test_bad_calibration_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(LlmpruneError, match=message):
        calibration_windows(str(path), byte_tokenizer(), nsamples=2, seqlen=8, seed=0)


def test_too_short_file_says_what_fits(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("twenty bytes of text")
    with pytest.raises(LlmpruneError, match=r"has 20 tokens, too short .* --seqlen 64; use --seqlen 19"):
        calibration_windows(str(path), byte_tokenizer(), nsamples=2, seqlen=64, seed=0)


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(LlmpruneError, match=r"bad.jsonl:2 has no string \"text\" field"):
        calibration_windows(str(path), byte_tokenizer(), nsamples=1, seqlen=2, seed=0)


def test_missing_file():
    with pytest.raises(LlmpruneError, match="does not exist"):
        calibration_windows("/no/such/file.txt", byte_tokenizer(), nsamples=1, seqlen=2, seed=0)
