"""The pruning engine on a CUDA GPU against the same run on the CPU: masks, weights, sparsity and time per method
(ALPS and pruning with quantization included), through the Python API, the CLI (in memory, --stream, quantized),
and torchrun with one NCCL process.

    python eval/gpu_prune_check.py --work /tmp/gpu-prune          # on a machine with a CUDA GPU
    python eval/gpu_prune_check.py --devices cpu,cpu             # a dry run of the harness without one
    python eval/gpu_prune_check.py --cases alps,w4a16 --no-cli   # only the cases whose description holds a word
    python eval/gpu_prune_check.py --timing                      # also ALPS, SparseGPT and GPTQ timed on wider layers

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
    dict(method="alps", sparsity=0.7, pattern="unstructured"),
    dict(method="alps", sparsity=0.5, pattern="2:4"),
    dict(method="alps", sparsity=0.7, pattern="unstructured", allocation="owl"),
    dict(method="admm", sparsity=0.7, pattern="unstructured"),
    dict(method="admm", sparsity=0.5, pattern="2:4"),
    dict(method="sparsegpt", sparsity=0.0, pattern="unstructured", quantize="w4a16"),  # GPTQ alone
    dict(method="sparsegpt", sparsity=0.5, pattern="2:4", quantize="w4a16"),
    dict(method="alps", sparsity=0.6, pattern="unstructured", quantize="w8a16"),
    dict(method="wanda", sparsity=0.5, pattern="unstructured", quantize="w4a16", symmetric=False),
]
# wider layers for --timing (random weights: the times, not the perplexities, are the point), on the device only
TIMING_MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16,
                    num_key_value_heads=8)
TIMING_CASES = [
    dict(method="sparsegpt", sparsity=0.7, pattern="unstructured"),
    dict(method="alps", sparsity=0.7, pattern="unstructured"),
    dict(method="sparsegpt", sparsity=0.5, pattern="2:4"),
    dict(method="alps", sparsity=0.5, pattern="2:4"),
    dict(method="sparsegpt", sparsity=0.0, pattern="unstructured", quantize="w4a16"),
    dict(method="sparsegpt", sparsity=0.5, pattern="2:4", quantize="w4a16"),
    dict(method="admm", sparsity=0.7, pattern="unstructured"),
]
CALIB = dict(calibration="wikitext2-valid", nsamples=16, seqlen=128, seed=0)


def describe(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def write_model(path: Path, **shape) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512), **shape})
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


def compare(a: dict, b: dict, pattern: str = "unstructured") -> dict:
    """How the weights `b` (device under test) agree with `a` (reference): kept/pruned state, exact values (the
    quantized cases: the same codes and scales give the same de-quantized values), and the N:M pattern in `b`."""
    total = sum(a[k].numel() for k in a)
    agree = sum(int(((a[k] != 0) == (b[k] != 0)).sum()) for k in a) / total
    exact = sum(int((a[k] == b[k]).sum()) for k in a) / total
    rel = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)
    sparsity = [1 - int(torch.count_nonzero(b[k])) / b[k].numel() for k in b]
    row = {"mask_agreement": agree, "exact_agreement": exact, "max_rel_weight_diff": rel,
           "sparsity_min": min(sparsity), "sparsity_max": max(sparsity)}
    if ":" in pattern:  # every group of m inputs keeps at most n weights (quantization may zero more, never fewer)
        n, m = map(int, pattern.split(":"))
        row["pattern_holds"] = all(int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) <= n for w in b.values())
    return row


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
    parser.add_argument("--cases", help="comma-separated words: only the API cases whose description holds one")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI, streaming and torchrun runs")
    parser.add_argument("--timing", action="store_true",
                        help="also time ALPS, SparseGPT and GPTQ on a 2-block model of hidden 2048 on the device under test")
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
    words = [w for w in (args.cases or "").split(",") if w]
    for case in CASES:
        if words and not any(w in describe(case) for w in words):
            continue
        row = dict(case)
        weights = {}
        for device in (ref_device, test_device):
            t0 = time.perf_counter()
            model, _ = llmprune.prune(str(model_dir), device=device, dtype="float32", **CALIB, **case)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row[f"{device}_s"] = round(time.perf_counter() - t0, 2)
            weights[device] = linear_weights(model)
        row.update(compare(weights[ref_device], weights[test_device], case["pattern"]))
        results["api"].append(row)
        print(json.dumps(row), flush=True)
    if test_device.startswith("cuda"):
        results["device_memory"] = block_memory(model_dir, test_device)
        print(json.dumps({"device_memory": results["device_memory"]}), flush=True)
    if args.timing:
        results["timing"] = timing(args.work, test_device)
    if not args.no_cli:
        results["cli"] = cli_runs(args.work, model_dir, ref_device, test_device)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def timing(work: Path, device: str) -> list[dict]:
    """Seconds per method on the wider model, each run twice (the first pays for compiling and warming the device),
    with its time relative to SparseGPT's at the same pattern."""
    import llmprune

    model_dir = work / "wide-model"
    if not model_dir.exists():
        write_model(model_dir, **TIMING_MODEL)
    rows = []
    for case in TIMING_CASES:
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            llmprune.prune(str(model_dir), device=device, dtype="float32", **CALIB, **case)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(round(time.perf_counter() - t0, 2))
        rows.append({**case, "device": device, "s": seconds})
        base = next((r for r in rows if r["method"] == "sparsegpt" and r["pattern"] == case["pattern"]
                     and r["sparsity"] == case["sparsity"] and "quantize" not in r), None)
        if base is not None and base is not rows[-1]:
            rows[-1]["vs_sparsegpt"] = round(seconds[-1] / base["s"][-1], 2)
        print(json.dumps({"timing": rows[-1]}), flush=True)
    return rows


def cli_runs(work: Path, model_dir: Path, ref_device: str, test_device: str) -> list[dict]:
    """The CLI in memory, streamed, quantized and under torchrun on the device under test, each checkpoint loaded
    back and compared with the same command's checkpoint made on the reference device."""
    import llmprune

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--method", "sparsegpt", "--pattern", "2:4", "--calib", "wikitext2-valid", "--nsamples", "16",
              "--seqlen", "128", "--dtype", "float32", "--json", "--overwrite"]
    quantized = ["--quantize", "w4a16", "--group-size", "64"]
    prune = [sys.executable, "-m", "llmprune", "prune", str(model_dir), *common]
    runs = {  # name: (command, the reference run it is compared with)
        "in memory": ([*prune, "--device", test_device], "reference (in memory)"),
        "stream": ([*prune, "--device", test_device, "--stream"], "reference (in memory)"),
        "torchrun 1 process": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "llmprune",
                                "prune", str(model_dir), *common, "--device", test_device], "reference (in memory)"),
        "quantized": ([*prune, *quantized, "--device", test_device], "reference (quantized)"),
        "quantized stream": ([*prune, *quantized, "--device", test_device, "--stream"], "reference (quantized)"),
        "reference (in memory)": ([*prune, "--device", ref_device], None),
        "reference (quantized)": ([*prune, *quantized, "--device", ref_device], None),
    }
    rows, outputs = [], {}
    for name, (command, _) in runs.items():
        out_dir = work / name.replace(" ", "-").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        proc = subprocess.run([*command, "--out", str(out_dir)], capture_output=True, text=True, env=env, cwd="/tmp")
        row = {"run": name, "rc": proc.returncode, "s": round(time.perf_counter() - t0, 1)}
        if proc.returncode:
            row["stderr"] = proc.stderr[-1500:]
        else:
            model, _ = llmprune.load(str(out_dir))
            outputs[name] = linear_weights(model)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        reference = outputs.get(runs[row["run"]][1])
        if reference is not None and row["run"] in outputs:
            row.update(compare(reference, outputs[row["run"]], "2:4"))
    print(json.dumps(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
