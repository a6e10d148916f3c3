"""Which metadata word layout the GPU's mma.sp m16n8k32 (16-bit types) reads, checked on random data: prints the
relative error of the 2:4 decode and GEMM kernels against the dense product for each candidate layout of
kernels.pack_24_tiles. The PTX ISA gives this layout only as a figure; this makes the hardware the judge.

    python eval/probe_sparse24_meta.py
"""
import torch

from llmprune import kernels
from llmprune.masks import Pattern, select_mask


def main() -> None:
    torch.manual_seed(0)
    rows, cols = 64, 256
    W = torch.randn(rows, cols, device="cuda")
    W = W.masked_fill(select_mask(W.abs(), 0.5, Pattern(2, 4)), 0.0).half()
    for layout in ("khalf", "row"):
        values, meta = kernels.pack_24_tiles(W, meta_layout=layout)
        for tokens in (3, 40):
            x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16)
            expected = x.double() @ W.double().T
            y = kernels.sparse24_matmul(values, meta, x, rows, cols)
            torch.cuda.synchronize()
            err = float((y.double() - expected).norm() / expected.norm())
            print(f"meta layout {layout:5s} tokens {tokens:3d}: relative error {err:.2e} {'OK' if err < 2e-3 else 'WRONG'}")


if __name__ == "__main__":
    main()
