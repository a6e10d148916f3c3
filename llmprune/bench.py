"""`llmprune bench`: kernel and end-to-end speed of a pruned model on a CUDA GPU.

Per linear shape and token count: dense cuBLAS (torch's F.linear on the pruned dense weight), our kernel, and
torch's semi-structured 2:4 path (to_sparse_semi_structured) for 2:4 weights. Each is timed as the median of
CUDA-event-timed replays of a captured CUDA graph that calls it once on each of several weight copies (more
bytes than the L2 cache holds, so weights come from device memory as they do in a model), after warm-up.
Then greedy decode tokens/s of the dense and of the sparsified model, one decode step per graph replay.
"""
from __future__ import annotations

import copy
import logging
import math
import platform
import statistics

import torch
from torch import nn

from llmprune import deploy, formats, kernels
from llmprune.errors import LlmpruneError
from llmprune.models import cache_keyword, get_weight

log = logging.getLogger(__name__)
TOKENS = (1, 16, 2048)


def environment(*, peaks: bool = True) -> dict:
    """Versions, GPU and, with `peaks`, the measured copy bandwidth and bf16 matrix rate (the ceilings)."""
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, sm=f"{props.major}{props.minor}", cuda=torch.version.cuda,
                    memory_gib=round(props.total_memory / 2**30, 1), l2_mib=round(props.L2_cache_size / 2**20, 1),
                    multiprocessors=props.multi_processor_count)
        try:
            import cupy

            info["cupy"] = cupy.__version__
            info["driver"] = cupy.cuda.runtime.driverGetVersion()
        except ImportError:
            info["cupy"] = None
        if peaks:
            info.update(measured_peaks())
    return info


def measured_peaks() -> dict:
    """Device-to-device copy GB/s (bytes read + written) and bf16 8192³ matmul TFLOP/s on random data, median of 10."""
    src = torch.randn(2**28, device="cuda", dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    copy_s = time_calls([lambda: dst.copy_(src)], repeats=10, graph=False)[0]
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = time_calls([lambda: a @ b], repeats=10, graph=False)[0]
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_gbs": 2 * 2**29 / copy_s / 1e9, "bf16_tflops": 2 * 8192**3 / mm_s / 1e12}


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise LlmpruneError("llmprune bench measures CUDA kernels and needs a CUDA GPU; none is visible here.")
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise LlmpruneError("llmprune bench needs CuPy for the kernels: pip install 'llmprune[cuda]' or 'llmprune[cuda13]'.") from None


def time_calls(calls: list, *, warmup: int = 3, repeats: int = 50, graph: bool = True) -> tuple[float, str]:
    """Median seconds per call of `calls` (run in turn), timed with CUDA events: over replays of a CUDA graph
    holding all of them where capture works (no launch gaps), else over plain launches. Returns (s, method)."""
    def run_all():
        for call in calls:
            call()

    for _ in range(warmup):
        run_all()
    torch.cuda.synchronize()
    step, method = run_all, "eager"
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run_all()
            g.replay()
            torch.cuda.synchronize()
            step, method = g.replay, "graph"
        except RuntimeError as err:  # capture refused (an op that syncs, say): time plain launches
            log.debug("CUDA graph capture failed (%s); timing plain launches", err)
            torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / len(calls))
    return statistics.median(times), method


def shape_rows(W: torch.Tensor, layout: str, *, tokens=TOKENS, repeats: int = 50) -> list[dict]:
    """Dense, ours and torch's 2:4 on one pruned weight W (on the GPU, float16/bfloat16), per token count."""
    rows, cols = W.shape
    l2 = torch.cuda.get_device_properties(W.device).L2_cache_size
    copies = max(2, min(16, math.ceil(3 * l2 / (W.numel() * W.element_size()))))
    dense = [W.clone() for _ in range(copies)]
    sparse = [deploy.SparseLinear(w, None, layout) for w in dense]
    semi = [_semi_structured(w) for w in dense] if layout == formats.SPARSE24 else None
    if semi is not None and any(s is None for s in semi):
        semi = None
    out = []
    for n in tokens:
        xs = [torch.randn(n, cols, device=W.device, dtype=W.dtype) for _ in range(copies)]
        expected = xs[0].double() @ W.double().T
        got = sparse[0](xs[0])
        rel_err = float((got.double() - expected).norm() / expected.norm())
        dense_s, method = time_calls([lambda i=i: nn.functional.linear(xs[i], dense[i]) for i in range(copies)], repeats=repeats)
        ours_s, ours_method = time_calls([lambda i=i: sparse[i](xs[i]) for i in range(copies)], repeats=repeats)
        paths = {}
        if n > kernels.DECODE_TOKENS:  # both prefill paths, whichever the layer's default is
            for path in ("mma", "expand"):
                paths[f"ours_{path}_s"], _ = time_calls([lambda i=i: _prefill(sparse[i], xs[i], path) for i in range(copies)],
                                                        repeats=repeats)
        semi_s = None
        if semi is not None:
            try:
                semi_s, _ = time_calls([lambda i=i: nn.functional.linear(xs[i], semi[i]) for i in range(copies)], repeats=repeats)
            except (RuntimeError, ValueError) as err:
                log.debug("torch semi-structured refused %d tokens: %s", n, err)
        io = W.element_size() * n * (rows + cols)
        out.append({
            "shape": [rows, cols], "layout": layout, "sparsity": 1 - int(torch.count_nonzero(W)) / W.numel(),
            "tokens": n, "dense_s": dense_s, "ours_s": ours_s, "torch_semi_s": semi_s,
            "speedup": dense_s / ours_s, "speedup_vs_torch_semi": semi_s / ours_s if semi_s else None,
            "dense_tflops": 2 * n * rows * cols / dense_s / 1e12, "ours_tflops": 2 * n * rows * cols / ours_s / 1e12,
            "dense_gbs": (W.numel() * W.element_size() + io) / dense_s / 1e9,
            "ours_gbs": (sparse[0].stored_bytes() + io) / ours_s / 1e9,
            "stored_over_dense": sparse[0].stored_bytes() / (W.numel() * W.element_size()),
            **paths, "rel_err": rel_err, "timing": f"{method}/{ours_method}, {copies} weight copies, median of {repeats}",
        })
    del dense, sparse, semi
    torch.cuda.empty_cache()
    return out


def _prefill(layer: deploy.SparseLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    if layer.layout == formats.SPARSE24:
        return kernels.sparse24_matmul(layer.values, layer.meta, x, layer.out_features, layer.in_features, prefill=path)
    return kernels.bitmask_matmul(layer.values, layer.offsets, layer.masks, x, layer.out_features, layer.in_features,
                                  prefill=path)


def kernel_table(model: nn.Module, *, dtype=torch.float16, tokens=TOKENS, repeats: int = 50) -> list[dict]:
    """One row per distinct (shape, layout) of the model's pruned linears and token count."""
    require_gpu()
    seen: dict[tuple, torch.Tensor] = {}
    for _, _, module in deploy.pruned_linears(model):
        W = get_weight(module).detach()
        seen.setdefault((tuple(W.shape), formats.choose_format({"w": W})), W)
    rows = []
    for (_, layout), W in seen.items():
        rows += shape_rows(W.to("cuda", dtype), layout, tokens=tokens, repeats=repeats)
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
        results[f"{name}_tokens_per_s"], results[f"{name}_timing"], results[f"{name}_ids"] = decode_tokens_per_s(m, ids, tokens)
    results["same_tokens"] = results.pop("dense_ids") == results.pop("sparse_ids")
    results["speedup"] = results["sparse_tokens_per_s"] / results["dense_tokens_per_s"]
    results["weights"] = swapped
    return results


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, str, list]:
    """Greedy decode speed after a prompt: one token per replay of a CUDA graph of the decode step over a static
    KV cache (what a serving engine does), or plain generate() where capture fails. Returns (tok/s, how, ids)."""
    from transformers import StaticCache

    prompt, kw = ids.shape[1], cache_keyword(model)
    try:
        cache = StaticCache(config=model.config, max_cache_len=prompt + tokens + 8)
        logits = model(input_ids=ids, **{kw: cache}, use_cache=True,
                       cache_position=torch.arange(prompt, device=ids.device)).logits
        step_ids = logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt], device=ids.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(input_ids=step_ids, **{kw: cache}, use_cache=True, cache_position=position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            next_ids = model(input_ids=step_ids, **{kw: cache}, use_cache=True,
                             cache_position=position).logits[:, -1:].argmax(-1)
        out = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(tokens):
            graph.replay()
            step_ids.copy_(next_ids)
            position.add_(1)
            out.append(step_ids.clone())
        end.record()
        end.synchronize()
        return tokens / (start.elapsed_time(end) / 1000), "CUDA graph per step, static cache", torch.cat(out, 1).tolist()
    except (RuntimeError, TypeError, ValueError) as err:
        log.warning("CUDA-graph decode failed (%s: %s); timing generate() instead", type(err).__name__, str(err)[:200])
        torch.cuda.synchronize()
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    end.record()
    end.synchronize()
    return tokens / (start.elapsed_time(end) / 1000), "generate(), eager", out[:, prompt:].tolist()


def _semi_structured(W: torch.Tensor):
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(W)
    except (RuntimeError, ImportError, ValueError):
        return None
