"""`llmprune bench`: kernel and end-to-end speed of a pruned model on a CUDA GPU.

Per linear shape and token count: dense cuBLAS (torch's F.linear on the pruned dense weight), our kernel
(decode sizes, at most 16 tokens), and torch's semi-structured 2:4 path (to_sparse_semi_structured) for 2:4
weights; each the median of CUDA-event-timed runs after warm-up, over several input sets so that caches do
not flatter it. Then decode tokens/s of the dense and of the sparsified model.
"""
from __future__ import annotations

import copy
import platform
import statistics

import torch
from torch import nn

from llmprune import deploy, formats
from llmprune.errors import LlmpruneError
from llmprune.models import get_weight

BATCHES = (1, 16, 2048)


def environment() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, sm=f"{props.major}{props.minor}", cuda=torch.version.cuda,
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            import cupy

            info["cupy"] = cupy.__version__
            info["driver"] = cupy.cuda.runtime.driverGetVersion()
        except ImportError:
            info["cupy"] = None
    return info


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise LlmpruneError("llmprune bench measures CUDA kernels and needs a CUDA GPU; none is visible here.")
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise LlmpruneError("llmprune bench needs CuPy for the kernels: pip install 'llmprune[cuda]'.") from None


def time_cuda(fn, inputs: list, *, warmup: int = 10, repeats: int = 50) -> float:
    """Median seconds of fn(x) over `repeats` runs, cycling through `inputs`, timed with CUDA events."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def kernel_table(model: nn.Module, *, dtype=torch.float16, batches=BATCHES, repeats: int = 50) -> list[dict]:
    """One row per distinct (shape, layout) of the model's pruned linears and token count."""
    require_gpu()
    seen: dict[tuple, torch.Tensor] = {}
    for _, _, module in deploy.pruned_linears(model):
        W = get_weight(module).detach()
        seen.setdefault((tuple(W.shape), formats.choose_format({"w": W})), W)
    rows = []
    for (shape, layout), W in seen.items():
        W = W.to("cuda", dtype)
        sparse = deploy.SparseLinear(W, None, layout).cuda()
        semi = _semi_structured(W) if layout == formats.SPARSE24 else None
        for batch in batches:
            inputs = [torch.randn(batch, shape[1], device="cuda", dtype=dtype) for _ in range(4)]
            dense_s = time_cuda(lambda x: nn.functional.linear(x, W), inputs, repeats=repeats)
            ours_s = (time_cuda(sparse, inputs, repeats=repeats)
                      if sparse._kernel_refusal(inputs[0]) is None else None)
            semi_s = time_cuda(lambda x: nn.functional.linear(x, semi), inputs, repeats=repeats) if semi is not None else None
            flops = 2 * batch * shape[0] * shape[1]
            io = 2 * batch * (shape[0] + shape[1])  # x in, y out, 16-bit
            rows.append({
                "shape": list(shape), "layout": layout, "tokens": batch, "dense_s": dense_s, "ours_s": ours_s,
                "torch_semi_s": semi_s, "speedup": dense_s / ours_s if ours_s else None,
                "dense_tflops": flops / dense_s / 1e12, "dense_gbs": (W.numel() * 2 + io) / dense_s / 1e9,
                "ours_gbs": (sparse.stored_bytes() + io) / ours_s / 1e9 if ours_s else None,
            })
    return rows


def decode_speed(model: nn.Module, *, tokens: int = 128, prompt: int = 16, dtype=torch.float16) -> dict:
    """Greedy decode tokens/s of the model as is (dense) and with its pruned linears sparsified."""
    require_gpu()
    results = {}
    dense = copy.deepcopy(model).to("cuda", dtype).eval()
    sparse = copy.deepcopy(model).to(dtype)
    swapped = deploy.sparsify(sparse)
    sparse = sparse.to("cuda").eval()
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, prompt), device="cuda")
    for name, m in (("dense", dense), ("sparse", sparse)):
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up, kernel compilation
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        end.record()
        end.synchronize()
        results[f"{name}_tokens_per_s"] = tokens / (start.elapsed_time(end) / 1000)
    results["speedup"] = results["sparse_tokens_per_s"] / results["dense_tokens_per_s"]
    results["weights"] = swapped
    return results


def _semi_structured(W: torch.Tensor):
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(W)
    except (RuntimeError, ImportError, ValueError):
        return None
