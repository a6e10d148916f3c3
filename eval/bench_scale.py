"""Memory and process-count benchmark of `llmprune prune` on synthetic Llama models too big to hold whole.

Writes random-weight Llama-architecture checkpoints as bf16 safetensors shards (one per block, never the
whole model in this process), then prunes them with Wanda in fp32 (8 × 512 calibration tokens, CPU: bf16
matmuls are ~7× slower than fp32 on CPUs without bf16 units) and reports
each run's wall time and peak resident memory:
  - streaming at two depths of the same width (the peak must not grow with depth),
  - the in-memory path at the smaller depth, for contrast,
  - 1 and 2 gloo processes (torchrun) on the same model, with a bit-for-bit comparison of the masks.

    python eval/bench_scale.py --text ../shared/data/wikitext2/valid.txt
    python eval/bench_scale.py --text ... --layers 4 8 --hidden 256 --intermediate 1024   # a quick check

Peak RSS is the largest `ru_maxrss` of the run's processes (for torchrun: of any one worker).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def write_model(path: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, seed: int) -> int:
    """A random Llama checkpoint in bf16 shards (one per block plus one for the rest) with index and tokenizer;
    returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from llmprune.models import resolve_source

    source = resolve_source("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True, dtype="bfloat16")
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def randn(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
              "mlp.down_proj.weight": (hidden, intermediate)}
    weight_map, count, shards = {}, 0, layers + 1
    for i in range(layers):
        tensors = {f"model.layers.{i}.{name}": randn(*shape) for name, shape in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        count += sum(t.numel() for t in tensors.values())
    rest = {"model.embed_tokens.weight": randn(config.vocab_size, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    count += sum(t.numel() for t in rest.values())
    size = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return count


PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run(command: list[str], log: Path) -> dict:
    """Run a command in a fresh wrapper process; its wall time and the peak RSS of its largest descendant."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(done.stdout + "\n---- stderr ----\n" + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    peak_kb = int(done.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_kb / 2**20, 3)}


def prune_command(model: Path, out: Path, text: str, *, stream: bool, processes: int = 1) -> list[str]:
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib", text, "--nsamples", "8",
            "--seqlen", "512", "--device", "cpu", "--dtype", "float32", "--out", str(out), "--overwrite", "--json",
            "--stream" if stream else "--no-stream"]
    if processes == 1:
        return [sys.executable, "-m", "llmprune", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "llmprune", *args]


def same_masks(a: Path, b: Path) -> bool:
    from llmprune.checkpoint import read_format, read_state_dict

    ta, tb = read_state_dict(a, read_format(a) or "dense"), read_state_dict(b, read_format(b) or "dense")
    return set(ta) == set(tb) and all(torch.equal(ta[k] == 0, tb[k] == 0) for k in ta)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a benchmark row needs beside its numbers: the commit, the CPU and the versions."""
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"git": git, "machine": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="calibration text file (e.g. ../shared/data/wikitext2/valid.txt)")
    parser.add_argument("--layers", type=int, nargs=2, default=[16, 32], help="the two depths compared")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/llmprune-bench-scale")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(args.workdir)
    info = {**machine_info(), "method": "wanda 50%",
            "calibration": "8 x 512", "compute_dtype": "float32", "width": {"hidden": args.hidden, "intermediate": args.intermediate}}
    print(json.dumps(info))
    rows = []
    small, large = args.layers
    models = {}
    for layers in (small, large):
        models[layers] = work / f"llama-{layers}L"
        if not (models[layers] / "config.json").is_file():
            params = write_model(models[layers], layers=layers, hidden=args.hidden, intermediate=args.intermediate,
                                 heads=args.heads, kv_heads=args.kv_heads, seed=0)
            (models[layers] / "params.txt").write_text(str(params))
    for label, layers, stream, processes in [("stream", small, True, 1), ("stream", large, True, 1),
                                             ("in memory", small, False, 1), ("stream, 2 gloo processes", small, True, 2)]:
        out = work / f"out-{layers}L-{'s' if stream else 'm'}-{processes}p"
        result = run(prune_command(models[layers], out, args.text, stream=stream, processes=processes),
                     work / f"{out.name}.log")
        params = int((models[layers] / "params.txt").read_text())
        row = {"run": label, "layers": layers, "params": params, "fp32_gib": round(params * 4 / 2**30, 2), **result}
        rows.append(row)
        print(json.dumps(row), flush=True)
    identical = same_masks(work / f"out-{small}L-s-1p", work / f"out-{small}L-s-2p")
    print(json.dumps({"two_processes_identical_masks": identical}))
    peaks = {r["layers"]: r["peak_rss_gib"] for r in rows if r["run"] == "stream"}
    print(json.dumps({"stream_peak_growth": round(peaks[large] / peaks[small] - 1, 3)}))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "identical_masks": identical}, indent=2) + "\n")


if __name__ == "__main__":
    main()
