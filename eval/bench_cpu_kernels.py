"""The CPU kernels' targets (README, "CPU kernels"), measured on this machine in one run.

1. Kernels on Llama-7B- and 1B-sized layer shapes (4096×4096, 11008×4096, 2048×8192), random weights pruned by
   magnitude to 50%, 70% and 2:4, at 1, 4, 16 and 512 tokens: dense F.linear fp32 and bf16, torch's CSR, ours
   with fp32 and bf16 values (llmprune.bench_cpu.shape_rows; weights rotated over copies larger than the LLC).
2. End to end: a 1B Llama-shaped model (hidden 2048, 16 layers, MLP 8192, random weights pruned by magnitude),
   greedy decode of 128 tokens after a 64-token prompt, batch 1: dense fp32 against ours (fp32 and bf16 values)
   at 50% and 70%, and at 50% the model cast to bf16, dense and ours (bf16 values and activations).

    python eval/bench_cpu_kernels.py [--json out.json] [--skip-kernels] [--skip-decode]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from llmprune import bench_cpu, masks


def magnitude(W: torch.Tensor, sparsity) -> torch.Tensor:
    pattern = masks.Pattern(2, 4) if sparsity == "2:4" else masks.UNSTRUCTURED
    prune = masks.select_mask(W.abs(), 0.5 if sparsity == "2:4" else sparsity, pattern)
    return W.masked_fill(prune, 0)


def one_b_model(sparsity: float, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune.models import find_blocks, find_linears

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    name, blocks = find_blocks(model)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for module in find_linears(block, f"{name}.{i}").values():
                module.weight.copy_(magnitude(module.weight, sparsity))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    result = {"environment": bench_cpu.environment(), "kernels": [], "decode": {}}
    print("machine:", result["environment"], flush=True)
    if not args.skip_kernels:
        for shape in ((4096, 4096), (11008, 4096), (2048, 8192)):
            W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            for sparsity in (0.5, 0.7, "2:4"):
                for r in bench_cpu.shape_rows(magnitude(W, sparsity), repeats=args.repeats):
                    r["pattern"] = str(sparsity)
                    result["kernels"].append(r)
                    print(f"{shape[0]}×{shape[1]} {sparsity!s:4} T={r['tokens']:3d} {r['method']:6} dense {r['dense_s'] * 1e3:8.3f} ms"
                          f"  bf16 {r['dense_bf16_s'] * 1e3:8.3f}  csr {r['csr_s'] * 1e3:9.3f}  ours fp32 {r['ours_float32_s'] * 1e3:8.3f}"
                          f" ({r['ours_float32_speedup']:.2f}×)  ours bf16 {r['ours_bfloat16_s'] * 1e3:8.3f} ({r['ours_bfloat16_speedup']:.2f}×)"
                          f"  bf16 x [{r['ours_bfloat16_model_method']}] {r['ours_bfloat16_model_s'] * 1e3:8.3f}"
                          f" ({r['ours_bfloat16_model_speedup']:.2f}×, {r['ours_bfloat16_model_over_bf16']:.2f}× dense bf16)"
                          f"  GB/s dense {r['dense_gbs']:.1f} ours {r['ours_float32_gbs']:.1f}/{r['ours_bfloat16_gbs']:.1f}", flush=True)
    if not args.skip_decode:
        for sparsity, dtypes in ((0.5, (torch.float32, torch.bfloat16)), (0.7, (torch.float32, torch.bfloat16))):
            started = time.perf_counter()
            model = one_b_model(sparsity)
            d = bench_cpu.decode_speed(model, tokens=128, prompt=64, value_dtypes=dtypes,
                                       model_dtypes=(torch.bfloat16,) if sparsity == 0.5 else ())
            result["decode"][str(sparsity)] = d
            line = f"1B Llama-shaped, {sparsity:.0%}: dense {d['dense']['tokens_per_s']:.2f} tok/s"
            for dt in dtypes:
                e = d["ours_" + str(dt).removeprefix("torch.")]
                line += (f"; ours {str(dt).removeprefix('torch.')} values {e['tokens_per_s']:.2f} tok/s ({e['speedup']:.2f}×,"
                         f" same tokens {e['same_tokens']})")
            if "ours_bfloat16_model" in d:
                e = d["ours_bfloat16_model"]
                line += (f"; the model in bf16: dense {d['dense_bfloat16']['tokens_per_s']:.2f} tok/s, ours {e['tokens_per_s']:.2f}"
                         f" ({e['speedup']:.2f}× dense fp32, {e['speedup_over_same_dtype']:.2f}× dense bf16, same tokens"
                         f" {e['same_tokens']})")
            print(line, f"[{time.perf_counter() - started:.0f} s]", flush=True)
            for name, e in [(k, v) for k, v in d.items() if k.startswith(("dense", "ours_")) and isinstance(v, dict)]:
                b = e["breakdown"]
                print(f"  step {name}: {b['step_s'] * 1e3:.1f} ms = linears {b['linears_s'] * 1e3:.1f} + head "
                      f"{b['head_s'] * 1e3:.1f} + other ops {b['other_ops_s'] * 1e3:.1f} + Python {b['python_s'] * 1e3:.1f}"
                      f" (profiled{'; head through our dense kernel' if e.get('dense_kernel') else ''})", flush=True)
            del model
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
