"""Tiny random models built from transformers configs, a byte-level tokenizer, and real-data locations."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_TEXT = REPO.parent / "shared" / "data" / "wikitext2" / "valid.txt"
VOCAB = 260


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = 256
    vocab["<pad>"] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_config(arch: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gemma3":
        return T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=256, eos_token_id=256)
    if arch == "phi":
        return T.PhiConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=256, **common)
    raise ValueError(arch)


ARCHS = ["llama", "gemma3", "qwen2", "opt", "gpt2", "phi"]


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: save a tiny random model + byte tokenizer to a directory and return its path."""

    def make(arch: str = "llama", seed: int = 0) -> Path:
        path = tmp_path / f"tiny-{arch}-{seed}"
        tiny_model(arch, seed).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        return path

    return make


@pytest.fixture
def text_file(tmp_path):
    """A plain-text calibration file of real-looking English (no download)."""
    from llmprune.data import BUNDLED

    path = tmp_path / "calib.txt"
    path.write_text(BUNDLED["wikitext2-valid"].read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the GGUF cache per session, never in the user's home."""
    if "LLMPRUNE_CACHE" not in os.environ:
        monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "llmprune-cache"))


def hub_cache(cache: Path, repo_id: str, directory: Path, revision: str = "main", commit: str = "0" * 40) -> Path:
    """A huggingface_hub cache holding `directory` as `repo_id` at `revision` (as a download would leave it), so that
    Hub ids resolve offline (HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1)."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(directory, repo / "snapshots" / commit, dirs_exist_ok=True)
    return cache


def plan_for(model, windows=None, *, device="cpu", microbatch=None, pattern="unstructured", **fields):
    """A Plan for calibrate.prune_model on a model in memory: recipe fields as keywords (a Pattern may be passed)."""
    from llmprune.plan import decide
    from llmprune.recipe import Recipe

    recipe = Recipe.create(pattern=str(pattern), **fields)
    seqlen = windows.shape[1] if windows is not None else recipe.seqlen
    return decide(recipe, model, windows, device=torch.device(device), seqlen=seqlen, microbatch=microbatch)
