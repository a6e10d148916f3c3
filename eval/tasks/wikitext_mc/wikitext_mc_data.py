"""Builds the wikitext_mc task from the WikiText-2 validation text that ships with llmprune."""
from __future__ import annotations

import random

CONTEXT_WORDS, CHOICE_WORDS, CHOICES, ITEMS, SEED = 10, 6, 4, 1000, 1234


def _sentences(text: str) -> list[list[str]]:
    words_of = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):  # skip blank lines and section headings
            continue
        for sentence in line.split(" . "):
            words = sentence.split()
            if len(words) >= CONTEXT_WORDS + CHOICE_WORDS:
                words_of.append(words)
    return words_of


def build(text: str, items: int = ITEMS, seed: int = SEED) -> list[dict]:
    """Deterministic items: context = a sentence's first words; choices = its next words and the same
    span of three other sentences, in shuffled order."""
    sentences = _sentences(text)
    rng = random.Random(seed)
    picked = rng.sample(range(len(sentences)), min(items, len(sentences)))
    docs = []
    for index in picked:
        words = sentences[index]
        span = slice(CONTEXT_WORDS, CONTEXT_WORDS + CHOICE_WORDS)
        correct = " ".join(words[span])
        others: list[str] = []
        while len(others) < CHOICES - 1:
            other = " ".join(sentences[rng.randrange(len(sentences))][span])
            if other != correct and other not in others:
                others.append(other)
        choices = [correct, *others]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:CONTEXT_WORDS]), "choices": choices, "label": choices.index(correct)})
    return docs


def load(**kwargs):
    import datasets

    from llmprune.data import BUNDLED

    docs = build(BUNDLED["wikitext2-valid"].read_text(encoding="utf-8"))
    return {"test": datasets.Dataset.from_list(docs)}
