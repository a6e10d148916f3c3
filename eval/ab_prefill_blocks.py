"""The CPU kernels' prefill path ("dense": row blocks expanded for torch's GEMM) against dense F.linear, for several
block sizes, timed in alternating rounds in one process so that a drifting machine still ranks them (README, "Sparse
kernels on a CPU": where BLOCK_BYTES comes from).

    python eval/ab_prefill_blocks.py [--tokens 512] [--sparsity 0.5] [--rounds 5] [--blocks-mib 8,16,32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmprune import cpu_kernels, masks

SHAPES = ((2048, 8192), (4096, 4096), (11008, 4096))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks-mib", default="8,16,32")
    args = ap.parse_args()
    module = cpu_kernels.extension()
    if module is None:
        raise SystemExit(f"error: {cpu_kernels.refusal()}")
    code = cpu_kernels.ISAS.index(cpu_kernels.best_isa())
    print(f"isa {cpu_kernels.best_isa()}, vendor {cpu_kernels.cpu_vendor()}, {torch.get_num_threads()} threads, "
          f"{args.tokens} tokens, {args.sparsity:.0%} sparse; ms per call, median of {args.rounds} rounds")
    for rows, cols in SHAPES:
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
        W = W.masked_fill(masks.select_mask(W.abs(), args.sparsity, masks.UNSTRUCTURED), 0)
        values, row_masks, offsets = cpu_kernels.pack_rows(W)
        kp = row_masks.shape[1] * 8
        x = torch.randn(args.tokens, kp)  # the kernels' input, padded to kp features; dense F.linear gets its own copy
        x_dense = x[:, :cols].contiguous()
        calls = {"dense": lambda: F.linear(x_dense, W)}
        for mib in (int(m) for m in args.blocks_mib.split(",")):
            block = max(16, (mib << 20) // (4 * kp))
            calls[f"{mib} MiB"] = lambda b=block: module.matmul_blocked(x, values, row_masks, offsets, code, b)
        calls["whole weight"] = lambda: module.matmul_blocked(x, values, row_masks, offsets, code, rows)
        times = {name: [] for name in calls}
        for round_ in range(args.rounds):
            for name, call in (calls.items() if round_ % 2 == 0 else reversed(calls.items())):
                call()
                start = time.perf_counter()
                call()
                call()
                times[name].append((time.perf_counter() - start) / 2)
        dense = statistics.median(times["dense"])
        cells = "  ".join(f"{name} {statistics.median(t) * 1e3:.1f} ({dense / statistics.median(t):.2f}x)"
                          for name, t in times.items())
        print(f"{rows}x{cols}: {cells}", flush=True)


if __name__ == "__main__":
    main()
