"""Reads ARC-Easy from a local JSON-lines file in either AI2's release format or the Hub's."""
from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT = Path(__file__).with_name("ARC-Easy-Test.jsonl")


def normalize(record: dict) -> dict:
    """The Hub's layout: question (str), choices {text: [...], label: [...]}, answerKey."""
    question, choices = record["question"], record.get("choices")
    if isinstance(question, dict):  # AI2's release: {"question": {"stem", "choices": [{"text", "label"}]}}
        choices = {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}
        question = question["stem"]
    return {"id": record.get("id", ""), "question": question, "choices": choices, "answerKey": record["answerKey"]}


def load(**kwargs):
    import datasets

    path = Path(os.environ.get("ARC_EASY_FILE", DEFAULT))
    if not path.is_file():
        raise FileNotFoundError(
            f"ARC-Easy data not found at {path}; download it once (allenai/ai2_arc, ARC-Easy, test) and save it "
            "there as JSON lines, or set ARC_EASY_FILE"
        )
    with path.open(encoding="utf-8") as handle:
        docs = [normalize(json.loads(line)) for line in handle if line.strip()]
    return {"test": datasets.Dataset.from_list(docs)}
