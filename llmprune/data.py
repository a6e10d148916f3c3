"""Calibration windows and evaluation token streams: c4, wikitext2 (Hugging Face datasets, the SparseGPT
protocol), the bundled WikiText-2 validation text, and local .txt / .jsonl files."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

BUNDLED = {"wikitext2-valid": Path(__file__).parent / "_data" / "wikitext2_valid.txt"}
HUB_SOURCES = ("wikitext2", "c4")
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"  # SparseGPT's calibration shard
C4_VALID = "en/c4-validation.00000-of-00008.json.gz"  # SparseGPT's evaluation shard
C4_EVAL_WINDOWS = 256  # SparseGPT evaluates C4 on its first 256 windows


def describe_sources() -> str:
    return ", ".join([*HUB_SOURCES, *BUNDLED, "PATH.txt", "PATH.jsonl"])


def _load_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise LlmpruneError(
            "this data source needs Hugging Face datasets; run: pip install 'llmprune[datasets]', "
            "or pass a local file (--calib PATH.txt) or the bundled 'wikitext2-valid'."
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types for network and hub failures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmpruneError(
            f"could not load {args[0]} from the Hugging Face Hub ({first}); when offline pass a local file "
            "(PATH.txt or PATH.jsonl) or the bundled 'wikitext2-valid'."
        ) from None


def read_text_file(path: Path) -> str:
    """Text of a local .txt (whole file) or .jsonl ("text" field of each line, joined by blank lines)."""
    if path.is_dir():
        raise LlmpruneError(f"text file '{path}' is a directory; pass a .txt or .jsonl file in it, or one of {describe_sources()}.")
    if not path.is_file():
        raise LlmpruneError(f"text file '{path}' does not exist; pass an existing .txt or .jsonl file, or one of {describe_sources()}.")
    raw = path.read_bytes()
    if not raw.strip():
        raise LlmpruneError(f"text file '{path}' is empty; pass a file with text in it.")
    if b"\0" in raw[:65536]:
        raise LlmpruneError(f"'{path}' looks binary (it holds NUL bytes); pass a UTF-8 text or JSON-lines file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlmpruneError(f"'{path}' is not UTF-8 text (bad byte at offset {exc.start}); pass a UTF-8 text file.") from None
    if path.suffix.lower() != ".jsonl":
        return text
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LlmpruneError(f"{path}:{number} is not valid JSON; each line of a .jsonl file must be an object with a \"text\" field.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LlmpruneError(f"{path}:{number} has no string \"text\" field; each line must look like {{\"text\": \"...\"}}.")
        texts.append(record["text"])
    if not any(t.strip() for t in texts):
        raise LlmpruneError(f"'{path}' holds no text; fill the \"text\" fields.")
    return "\n\n".join(texts)


def _local_text(source: str) -> str:
    if source in BUNDLED:
        return BUNDLED[source].read_text(encoding="utf-8")
    return read_text_file(Path(source).expanduser())


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids [1, n] of a whole text, tokenized once."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.to(torch.long)


def _sample(stream: Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> Tensor:
    """SparseGPT's sampling: random.seed(seed); start = randint(0, ntokens - seqlen - 1) per window."""
    ntokens = stream.shape[1]
    if ntokens - seqlen - 1 < 0:
        raise LlmpruneError(
            f"calibration text {what} has {ntokens} tokens, too short for one window of --seqlen {seqlen}; "
            f"use --seqlen {max(ntokens - 1, 1)} or less, or a longer text."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ntokens - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[0, s : s + seqlen] for s in starts])


def calibration_windows(source: str, tokenizer, *, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """[nsamples, seqlen] token windows for calibration."""
    if nsamples < 1 or seqlen < 1:
        raise LlmpruneError(f"--nsamples and --seqlen must be positive; got {nsamples} and {seqlen}.")
    if source == "wikitext2":
        data = _load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        return _sample(tokenize(tokenizer, " ".join(data["text"])), nsamples, seqlen, seed, "wikitext2 (train)")
    if source == "c4":
        return _c4_windows(tokenizer, nsamples, seqlen, seed)
    return _sample(tokenize(tokenizer, _local_text(source)), nsamples, seqlen, seed, f"'{source}'")


def _c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """SparseGPT's C4 sampling: a random document longer than seqlen tokens, then a random window in it."""
    data = _load_dataset("allenai/c4", data_files={"train": C4_TRAIN}, split="train")
    rng = random.Random(seed)
    windows = []
    while len(windows) < nsamples:
        doc = tokenize(tokenizer, data[rng.randint(0, len(data) - 1)]["text"])
        if doc.shape[1] <= seqlen:
            continue
        start = rng.randint(0, doc.shape[1] - seqlen - 1)
        windows.append(doc[0, start : start + seqlen])
    return torch.stack(windows)


def eval_tokens(source: str, tokenizer, *, seqlen: int) -> Tensor:
    """Token stream [1, n] for perplexity: the test text joined with blank lines and tokenized once."""
    if source == "wikitext2":
        data = _load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return tokenize(tokenizer, "\n\n".join(data["text"]))
    if source == "c4":
        data = _load_dataset("allenai/c4", data_files={"validation": C4_VALID}, split="validation")
        ids = tokenize(tokenizer, " ".join(data[:1100]["text"]))
        return ids[:, : C4_EVAL_WINDOWS * seqlen]
    return tokenize(tokenizer, _local_text(source))
