"""SparseGPT on a CUDA GPU against the CPU on the same inputs: one linear with real-looking correlated inputs (layer
error ‖(W − Ŵ)X‖² / ‖WX‖² and mask agreement on each device), so float-order differences between devices can be told
apart from a device-specific bug.

    python eval/gpu_sparsegpt_parity.py
"""
import json

import torch

from llmprune.masks import Pattern
from llmprune.solvers import make_solver


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows, cols, tokens = 512, 1024, 4096
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(tokens, cols, generator=g) @ mix + 0.1 * torch.randn(tokens, cols, generator=g)  # correlated inputs
    W = torch.randn(rows, cols, generator=g)
    for pattern in (Pattern(), Pattern(2, 4)):
        out = {}
        for device in ("cpu", "cuda"):
            solver = make_solver("sparsegpt", cols, device)
            for chunk in X.split(512):
                solver.add_batch(chunk.to(device))
            pruned = solver.prune(W.to(device), 0.5, pattern).cpu()
            error = float(((W - pruned) @ X.T).norm() ** 2 / (W @ X.T).norm() ** 2)
            out[device] = (pruned, error)
        agree = float(((out["cpu"][0] != 0) == (out["cuda"][0] != 0)).float().mean())
        print(json.dumps({"pattern": str(pattern), "cpu_error": out["cpu"][1], "cuda_error": out["cuda"][1],
                          "mask_agreement": agree}), flush=True)


if __name__ == "__main__":
    main()
