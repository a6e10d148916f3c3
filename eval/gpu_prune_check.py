"""The pruning engine on a CUDA GPU against the same run on the CPU: masks, weights, sparsity and time per method,
through the Python API, the CLI (in memory and --stream), and torchrun with one NCCL process.

    python eval/gpu_prune_check.py --work /tmp/gpu-prune          # on a machine with a CUDA GPU
    python eval/gpu_prune_check.py --devices cpu,cpu             # a dry run of the harness without one

The model is a random Llama (4 blocks, hidden 256) with a byte-level tokenizer, written by the script; the
calibration text is the bundled WikiText-2 validation split (16 windows of 128 tokens), so nothing is downloaded.
Agreement is the share of weights whose kept/pruned state is the same on both devices. On a CUDA device the
script also measures peak device memory while each block is placed (one block on the device at a time: a block's
bytes plus activations, never the whole model) and checks that every parameter is back on the CPU afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CASES = [
    dict(method="magnitude", sparsity=0.5, pattern="unstructured"),
    dict(method="wanda", sparsity=0.5, pattern="unstructured"),
    dict(method="wanda", sparsity=0.5, pattern="2:4"),
    dict(method="sparsegpt", sparsity=0.5, pattern="unstructured"),
    dict(method="sparsegpt", sparsity=0.5, pattern="2:4"),
    dict(method="sparsegpt", sparsity=0.5, pattern="4:8", refine="dsnot"),
    dict(method="wanda", sparsity=0.7, pattern="unstructured", allocation="owl", refine="dsnot"),
]
CALIB = dict(calibration="wikitext2-valid", nsamples=16, seqlen=128, seed=0)


def write_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def linear_weights(model) -> dict[str, torch.Tensor]:
    from llmprune.models import find_blocks, find_linears, get_weight

    name, blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        for path, module in find_linears(block, f"{name}.{i}").items():
            out[path] = get_weight(module).detach().float().cpu()
    return out


def compare(a: dict, b: dict) -> dict:
    agree = sum(int(((a[k] != 0) == (b[k] != 0)).sum()) for k in a) / sum(a[k].numel() for k in a)
    rel = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)
    sparsity = [1 - int(torch.count_nonzero(b[k])) / b[k].numel() for k in b]
    return {"mask_agreement": agree, "max_rel_weight_diff": rel, "sparsity_min": min(sparsity), "sparsity_max": max(sparsity)}


def block_memory(model_dir: Path, device: str) -> dict:
    """Peak device memory while each block is on `device` (reset when it arrives), against one block's and the whole
    model's parameter bytes; and where every parameter is once pruning returns. Wraps the loop's `placed`."""
    import llmprune
    from llmprune.calibrate import loop

    peaks: list[int] = []
    original = loop.placed

    @contextlib.contextmanager
    def recording(module, target):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with original(module, target) as placed_module:
            yield placed_module
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())

    loop.placed = recording
    try:
        model, _ = llmprune.prune(str(model_dir), device=device, dtype="float32", method="sparsegpt", sparsity=0.5,
                                  pattern="2:4", **CALIB)
    finally:
        loop.placed = original
    from llmprune.models import find_blocks

    _, blocks = find_blocks(model)
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    devices = sorted({str(p.device) for p in model.parameters()})
    row = {"peak_per_block_mib": [round(b / 2**20, 2) for b in peaks], "block_mib": round(block_bytes / 2**20, 2),
           "model_mib": round(model_bytes / 2**20, 2), "parameter_devices_after": devices,
           "after_prune_allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 2)}
    # the peak of a later block must not grow with the blocks already pruned (the bug: they all stayed on the GPU)
    row["ok"] = (devices == ["cpu"] and len(peaks) == len(blocks)
                 and max(peaks) - min(peaks) < 2 * block_bytes)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmprune-gpu-prune"))
    parser.add_argument("--devices", default="cpu,cuda", help="reference device, device under test")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    ref_device, test_device = args.devices.split(",")
    import llmprune

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "model"
    if not model_dir.exists():
        write_model(model_dir)
    results = {"environment": {"torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "api": [], "cli": []}
    for case in CASES:
        row = dict(case)
        weights = {}
        for device in (ref_device, test_device):
            t0 = time.perf_counter()
            model, _ = llmprune.prune(str(model_dir), device=device, dtype="float32", **CALIB, **case)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row[f"{device}_s"] = round(time.perf_counter() - t0, 2)
            weights[device] = linear_weights(model)
        row.update(compare(weights[ref_device], weights[test_device]))
        results["api"].append(row)
        print(json.dumps(row), flush=True)
    if test_device.startswith("cuda"):
        results["device_memory"] = block_memory(model_dir, test_device)
        print(json.dumps({"device_memory": results["device_memory"]}), flush=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--method", "sparsegpt", "--pattern", "2:4", "--calib", "wikitext2-valid", "--nsamples", "16",
              "--seqlen", "128", "--dtype", "float32", "--json", "--overwrite"]
    runs = {
        "in memory": [sys.executable, "-m", "llmprune", "prune", str(model_dir), *common, "--device", test_device],
        "stream": [sys.executable, "-m", "llmprune", "prune", str(model_dir), *common, "--device", test_device, "--stream"],
        "torchrun 1 process": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "llmprune",
                               "prune", str(model_dir), *common, "--device", test_device],
        "reference (in memory)": [sys.executable, "-m", "llmprune", "prune", str(model_dir), *common, "--device", ref_device],
    }
    outputs = {}
    for name, command in runs.items():
        out_dir = args.work / name.replace(" ", "-").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        proc = subprocess.run([*command, "--out", str(out_dir)], capture_output=True, text=True, env=env, cwd="/tmp")
        row = {"run": name, "rc": proc.returncode, "s": round(time.perf_counter() - t0, 1)}
        if proc.returncode:
            row["stderr"] = proc.stderr[-1500:]
        else:
            model, _ = llmprune.load(str(out_dir))
            outputs[name] = linear_weights(model)
        results["cli"].append(row)
        print(json.dumps(row), flush=True)
    reference = outputs.get("reference (in memory)")
    for row in results["cli"]:
        if reference is not None and row["run"] in outputs:
            row.update(compare(reference, outputs[row["run"]]))
    print(json.dumps(results["cli"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
