"""Decode-kernel launch shapes tried side by side on one GPU: the library's .cu files compiled with other warps per
block / steps in flight (their -D macros), each timed like `llmprune bench` (median of CUDA-graph replays over weight
copies larger than L2) at 1 token on Llama-7B-shaped layers, with its error against the dense product.

    python eval/tune_decode.py

Prints one line per variant and shape, the library's defaults first; nothing here changes the defaults.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from llmprune import bench, kernels
from llmprune.masks import Pattern, select_mask

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
VARIANTS = {
    "sparse24_mma.cu": [dict(SPARSE24_DECODE_WARPS=w, SPARSE24_DECODE_STEPS=u) for w, u in
                        [(8, 4), (4, 4), (16, 4), (8, 2), (16, 2), (4, 8)]],
    "bitmask_mma.cu": [dict(BITMASK_DECODE_WARPS=w, BITMASK_DECODE_STEPS=u, BITMASK_DECODE_MIN_BLOCKS=b) for w, u, b in
                       [(8, 4, 3), (16, 2, 2), (8, 2, 4), (8, 4, 2), (4, 8, 3), (4, 4, 6)]],
}


def compile_variant(source: str, macros: dict, name: str):
    import cupy

    device = cupy.cuda.Device()
    options = ("-std=c++17", f"--gpu-architecture=sm_{device.compute_capability}", f"-I{kernels.source_dir()}",
               *(f"-D{k}={v}" for k, v in macros.items()))
    return cupy.RawModule(code=(kernels.source_dir() / source).read_text(), options=options).get_function(name)


def launcher(function, threads: int, grid: int, args: tuple):
    import cupy

    raw = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.int32(a) for a in args)

    def call():
        with kernels._cupy_stream(cupy, torch.cuda.current_stream(), torch.cuda.current_device()):
            function((grid,), (threads,), raw)
    return call


def main() -> None:
    bench.require_gpu()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(json.dumps({k: v for k, v in bench.environment(peaks=False).items()}), flush=True)
    for rows, cols in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(rows + cols)
        W = torch.randn(rows, cols, device="cuda", generator=g)
        copies = max(2, min(16, math.ceil(3 * l2 / (W.numel() * 2))))
        x = torch.randn(copies, 1, cols, device="cuda", dtype=torch.float16)
        W24 = W.masked_fill(select_mask(W.abs(), 0.5, Pattern(2, 4)), 0.0).half()
        Wbm = W.masked_fill(select_mask(W.abs(), 0.5, Pattern()), 0.0).half()
        packed = {"sparse24_mma.cu": [kernels.pack_24_tiles(W24) for _ in range(copies)],
                  "bitmask_mma.cu": [kernels.pack_bitmask_tiles(Wbm) for _ in range(copies)]}
        dense = {"sparse24_mma.cu": W24, "bitmask_mma.cu": Wbm}
        weights = [W24.clone() for _ in range(copies)]
        dense_s, _ = bench.time_calls([lambda i=i: torch.nn.functional.linear(x[i], weights[i]) for i in range(copies)])
        for source, variants in VARIANTS.items():
            name = "sparse24_decode_f16_n1" if source.startswith("sparse24") else "bitmask_decode_f16_n1"
            for macros in variants:
                warps = next(v for k, v in macros.items() if k.endswith("_WARPS"))
                function = compile_variant(source, macros, name)
                m_tiles, k_tiles = kernels.tile_counts(rows, cols)
                ys = [torch.full((1, rows), float("nan"), device="cuda", dtype=torch.float16) for _ in range(copies)]
                calls = []
                for i, parts in enumerate(packed[source]):
                    calls.append(launcher(function, 32 * warps, m_tiles, (*parts, x[i], ys[i], rows, k_tiles, cols, 1)))
                calls[0]()
                torch.cuda.synchronize()
                expected = x[0].double() @ dense[source].double().T
                err = float((ys[0].double() - expected).norm() / expected.norm())
                s, method = bench.time_calls(calls)
                print(f"{rows}x{cols} {source:16s} {json.dumps(macros)} {s * 1e6:7.1f} us  x{dense_s / s:.2f} vs dense "
                      f"{dense_s * 1e6:.1f} us  err {err:.1e} ({method})", flush=True)


if __name__ == "__main__":
    main()
