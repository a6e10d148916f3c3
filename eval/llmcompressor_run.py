"""One llm-compressor `oneshot` run (pruning, GPTQ quantization, or both), for bench_prune.py's comparison rows; run
it with the Python of an environment that has llm-compressor (it pins its own transformers, so it lives apart from
llmprune's):

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0
    /tmp/lcvenv/bin/python eval/llmcompressor_run.py MODEL_DIR WINDOWS.safetensors sparsegpt 2:4 0.5 OUT_DIR
    /tmp/lcvenv/bin/python eval/llmcompressor_run.py MODEL_DIR WINDOWS.safetensors gptq unstructured 0 OUT_DIR \
        --bits 4 --group-size 128
    /tmp/lcvenv/bin/python eval/llmcompressor_run.py MODEL_DIR WINDOWS.safetensors sparsegpt+gptq 2:4 0.5 OUT_DIR \
        --bits 4 --group-size 128

MODEL_DIR: a dense Hugging Face directory, with a tokenizer (oneshot loads one even for tokenized data); WINDOWS:
the calibration token windows ("input_ids" [n, seqlen]) that llmprune's own run samples, so both prune from the
same tokens. The sequential pipeline, the modifiers' defaults
(dampening 0.01, block 128), every Linear but lm_head.

Methods: sparsegpt, wanda (pruning alone: PATTERN and SPARSITY; writes dense safetensors); gptq (GPTQModifier alone:
int weights, 16-bit activations, symmetric, --bits 4|8, --group-size G with 0 for one scale per output row;
PATTERN and SPARSITY are ignored, pass e.g. `unstructured 0`); sparsegpt+gptq, wanda+gptq (the pruning modifier,
then the GPTQModifier, in one recipe: llm-compressor's "prune then quantize"). GPTQModifier keeps its other
defaults, among them actorder "static" (columns quantized in order of the Hessian's diagonal; groups keep the
original column order, so no g_idx is written). Quantized runs write a compressed-tensors pack-quantized checkpoint.

Writes OUT_DIR (the model's tokenizer files too, where MODEL_DIR has them) and prints one JSON line with the
`oneshot` time (the model is loaded before the clock starts), the sparsity of the Linears but lm_head (for
quantized runs: of the dequantized weights, i.e. the values GPTQ leaves in the model before it is packed) and,
for quantized runs, the "scheme" (as llmprune describes it: "w4a16 g128 symmetric").
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

PRUNERS = ("sparsegpt", "wanda")
METHODS = (*PRUNERS, "gptq", *(f"{p}+gptq" for p in PRUNERS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("pattern", help="unstructured or N:M (ignored for gptq)")
    ap.add_argument("sparsity", type=float, help="ignored for gptq")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4, help="weight bits of the quantized methods")
    ap.add_argument("--group-size", type=int, default=128,
                    help="inputs per scale of the quantized methods; 0: one scale per output row (channel strategy)")
    args = ap.parse_args()
    if args.group_size < 0:
        ap.error("--group-size must be positive, or 0 for per-channel")

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    pruner, _, quantizer = args.method.partition("+")
    quantize = "gptq" in (pruner, quantizer)
    pruner = None if pruner == "gptq" else pruner

    ids = load_file(args.windows)["input_ids"]
    n, seqlen = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    common = dict(targets=["Linear"], ignore=["re:.*lm_head"])
    recipe = []
    if pruner is not None:
        structure = "0:0" if args.pattern == "unstructured" else args.pattern
        cls = SparseGPTModifier if pruner == "sparsegpt" else WandaPruningModifier
        recipe.append(cls(sparsity=args.sparsity, mask_structure=structure, **common))
    if quantize:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        from llmcompressor.modifiers.quantization import GPTQModifier

        # config_groups rather than the preset "W4A16"/"W8A16" schemes, whose group size is fixed (128 / channel).
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True,
                                   strategy="group" if args.group_size else "channel",
                                   group_size=args.group_size or None)
        scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=None,
                                    output_activations=None)
        # Mask preservation (llm-compressor 0.14.0.1, compressed-tensors 0.19.0): GPTQ keeps no mask. Nothing in
        # llmcompressor/modifiers/gptq/ (base.py, gptq_quantize.py, helpers.py) reads a mask or the sparsity:
        # quantize_weight propagates every column's error into the later columns, pruned ones included
        # (gptq_quantize.py:183 `W1[:, :, i:] -= error * Hinv1[:, i, i:]`, :123 `W[:, :, i2:] -= w_err`); the only
        # zeroing is of dead Hessian columns (helpers.py:297-300). On a tiny Llama, 2:4 then W4A16 g128 kept 76-94%
        # of the zeros and 72-95% of the groups of 4 per Linear had 2 zeros: 2:4 no longer holds after GPTQ.
        recipe.append(GPTQModifier(config_groups={"group_0": scheme}, ignore=["re:.*lm_head"]))
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe[0] if len(recipe) == 1 else recipe, num_calibration_samples=n,
            max_seq_length=seqlen, shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - started

    # Counted before saving: a compressed save replaces each quantized weight by its packed codes. After GPTQ the
    # weights hold the dequantized values (codes × scale), so this is the sparsity of the dequantized weights.
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()

    out = Path(args.out)
    if quantize:
        model.save_pretrained(out, save_compressed=True, quantization_format="pack-quantized")
        fmt = json.loads((out / "config.json").read_text()).get("quantization_config", {}).get("format")
        if fmt != "pack-quantized":
            raise SystemExit(f"{out}/config.json: quantization_config format {fmt!r}, not pack-quantized")
    else:
        model.save_pretrained(out, save_compressed=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(args.model) / name).is_file():
            shutil.copyfile(Path(args.model) / name, out / name)
    result = {"prune_s": seconds, "sparsity": zeros / total, "llmcompressor": llmcompressor.__version__,
              "transformers": __import__("transformers").__version__, "windows": [n, seqlen]}
    if quantize:
        group = f"g{args.group_size}" if args.group_size else "per channel"
        result.update(method=args.method, scheme=f"w{args.bits}a16 {group} symmetric",
                      compressed_tensors=__import__("compressed_tensors").__version__)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
