"""Judge a change to the CPU kernels: two source folders built side by side in one process, one-token calls
timed in alternating rounds (A B, B A, ...), so a machine whose speed drifts between runs (shared VMs moved by up
to 1.8x here) still ranks them. Each folder holds bitmask_cpu.cpp and bitmask_cpu_body.h.

    python eval/ab_cpu_kernels.py kernels /tmp/changed [--tokens 1] [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from llmprune import cpu_kernels, masks


def build(folder: Path, tag: str):
    out = Path(tempfile.mkdtemp(prefix=f"ab-{tag}-"))
    return cpp_extension.load(name=f"llmprune_ab_{tag}", sources=[str(folder / "bitmask_cpu.cpp")],
                              extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              extra_include_paths=[str(folder)], build_directory=str(out), verbose=False)


def median_call(call, repeats: int = 10) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    mods = {"A": build(args.a, "a"), "B": build(args.b, "b")}
    for m in mods.values():
        cpu_kernels.configure(m)  # the per-vendor choices llmprune makes, where the source has them
    isa = cpu_kernels.ISAS.index(cpu_kernels.best_isa())
    for rows, cols, sparsity in ((4096, 4096, 0.5), (11008, 4096, 0.5), (2048, 8192, 0.5), (11008, 4096, 0.7),
                                 (4096, 4096, "2:4"), (2048, 8192, 0.7)):
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
        pattern = masks.Pattern(2, 4) if sparsity == "2:4" else masks.UNSTRUCTURED
        W = W.masked_fill(masks.select_mask(W.abs(), 0.5 if sparsity == "2:4" else sparsity, pattern), 0)
        for dtype in (torch.float32, torch.bfloat16):
            packs = [cpu_kernels.pack_rows(W, dtype) for _ in range(3)]  # copies: weights come from memory
            x = torch.randn(args.tokens, packs[0][1].shape[1] * 8)
            times = {"A": [], "B": []}
            for round_ in range(args.rounds):
                for tag in ("AB" if round_ % 2 == 0 else "BA"):
                    m = mods[tag]
                    times[tag].append(median_call(lambda: [m.matmul_expand(x, *p, isa) for p in packs]) / len(packs))
            diff = float((mods["A"].matmul_expand(x, *packs[0], isa) - mods["B"].matmul_expand(x, *packs[0], isa)).abs().max())
            a, b = statistics.median(times["A"]), statistics.median(times["B"])
            print(f"{rows}x{cols} {sparsity!s:4} {str(dtype).removeprefix('torch.'):8} A {a * 1e3:.3f} ms  B {b * 1e3:.3f} ms"
                  f"  B is {a / b:.2f}x as fast  max |A - B| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
