"""One llm-compressor `oneshot` pruning run, for bench_prune.py's comparison rows; run it with the Python of an
environment that has llm-compressor (it pins its own transformers, so it lives apart from llmprune's):

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0
    /tmp/lcvenv/bin/python eval/llmcompressor_run.py MODEL_DIR WINDOWS.safetensors sparsegpt 2:4 0.5 OUT_DIR

MODEL_DIR: a dense Hugging Face directory; WINDOWS: the calibration token windows ("input_ids" [n, seqlen]) that
llmprune's own run samples, so both prune from the same tokens. The sequential pipeline, the modifier's defaults
(dampening 0.01, block 128), every Linear but lm_head. Writes OUT_DIR (dense safetensors, the model's tokenizer)
and prints one JSON line with the pruning time (the `oneshot` call: the model is loaded before the clock starts).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("method", choices=["sparsegpt", "wanda"])
    ap.add_argument("pattern", help="unstructured or N:M")
    ap.add_argument("sparsity", type=float)
    ap.add_argument("out")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = load_file(args.windows)["input_ids"]
    n, seqlen = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common = dict(targets=["Linear"], ignore=["re:.*lm_head"])
    cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    modifier = cls(sparsity=args.sparsity, mask_structure=structure, **common)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=n, max_seq_length=seqlen,
            shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - started

    out = Path(args.out)
    model.save_pretrained(out, save_compressed=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(args.model) / name).is_file():
            shutil.copyfile(Path(args.model) / name, out / name)
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    print(json.dumps({"prune_s": seconds, "sparsity": zeros / total, "llmcompressor": llmcompressor.__version__,
                      "transformers": __import__("transformers").__version__, "windows": [n, seqlen]}), flush=True)


if __name__ == "__main__":
    main()
