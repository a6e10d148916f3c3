"""Speed of our sparse kernels against dense cuBLAS and torch's 2:4 path on Llama-7B-shaped layers, and the end-to-end
decode speed of a sparsified 1B-class Llama (random weights pruned by magnitude), on one CUDA GPU.

    python eval/bench_kernels.py --out results.json

Prints the environment (GPU, driver, CUDA, torch, CuPy, git hash, the measured copy bandwidth and bf16 matrix rate),
a table per layer shape x layout x token count (medians of CUDA-event-timed CUDA-graph replays over weight copies
larger than the L2 cache; see llmprune/bench.py), each with the kernel's relative error against the dense product,
then decode tokens/s. One run; nothing is averaged across runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]


def git_hash() -> str:
    import os

    if os.environ.get("LLMPRUNE_COMMIT"):  # a copy of the tree without its history (the device machine)
        return os.environ["LLMPRUNE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def prune_(W: torch.Tensor, layout: str, sparsity: float) -> None:
    """Magnitude pruning in place: 2:4 within each group of four, or `sparsity` of each row."""
    from llmprune.masks import Pattern, select_mask

    pattern = Pattern(2, 4) if layout == "2:4" else Pattern()
    W.masked_fill_(select_mask(W.abs(), 0.5 if pattern.structured else sparsity, pattern), 0.0)


def pruned_weight(rows: int, cols: int, layout: str, sparsity: float, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(rows, cols, device="cuda", generator=g, dtype=torch.float32)
    prune_(W, layout, sparsity)
    return W.to(dtype)


def prune_model_(model, layout: str, sparsity: float) -> None:
    from llmprune.models import find_blocks, find_linears, get_weight

    _, blocks = find_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for module in find_linears(block, "").values():
                prune_(get_weight(module), layout, sparsity)


def llama_1b(dtype):
    """Llama-3.2-1B's shape (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocab 128256), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--tokens", default="1,16,2048")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--layouts", default="2:4,bitmask@0.5,bitmask@0.7")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-layouts", default="2:4,bitmask@0.7", help="'' to skip the end-to-end decode")
    args = parser.parse_args()

    from llmprune import bench, formats

    bench.require_gpu()
    dtype = getattr(torch, args.dtype)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    env = bench.environment()
    env.update(git=git_hash(), dtype=args.dtype)
    print("environment:", json.dumps(env), flush=True)
    result = {"environment": env, "kernels": [], "decode": []}

    for spec in filter(None, args.layouts.split(",")):
        layout, _, sparsity = spec.partition("@")
        sparsity = float(sparsity or 0.5)
        for rows, cols in LLAMA_7B:
            W = pruned_weight(rows, cols, layout, sparsity, dtype, seed=rows + cols)
            fmt = formats.SPARSE24 if layout == "2:4" else formats.BITMASK
            t0 = time.perf_counter()
            for row in bench.shape_rows(W, fmt, tokens=tokens, repeats=args.repeats):
                result["kernels"].append(row)
                semi = f"{row['torch_semi_s'] * 1e6:8.1f}" if row["torch_semi_s"] else "       —"
                extra = "".join(f"  {k[5:-2]} {row[k] * 1e6:.1f} us" for k in ("ours_mma_s", "ours_expand_s") if k in row)
                print(f"{rows:>5}x{cols:<5} {spec:<12} {row['tokens']:>5} tok  dense {row['dense_s'] * 1e6:8.1f} us"
                      f"  ours {row['ours_s'] * 1e6:8.1f} us  torch2:4 {semi} us  x{row['speedup']:.2f}"
                      f"  ours {row['ours_gbs']:6.0f} GB/s {row['ours_tflops']:6.1f} TF/s  err {row['rel_err']:.1e}"
                      f"  ({row['timing']}){extra}", flush=True)
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)

    for spec in filter(None, args.decode_layouts.split(",")):
        layout, _, sparsity = spec.partition("@")
        model = llama_1b(dtype)
        prune_model_(model, layout, float(sparsity or 0.5))
        d = bench.decode_speed(model, tokens=args.decode_tokens, dtype=dtype)
        d["layout"] = spec
        result["decode"].append(d)
        print(f"decode 1B Llama {spec}: dense {d['dense_tokens_per_s']:.1f} tok/s, sparse {d['sparse_tokens_per_s']:.1f}"
              f" tok/s, x{d['speedup']:.2f} ({d['sparse_timing']}; {d['weights']['swapped']} linears at "
              f"{d['weights']['stored_bytes'] / d['weights']['dense_bytes']:.3f}x bytes; same tokens: {d['same_tokens']})",
              flush=True)
        del model
        torch.cuda.empty_cache()

    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
