"""`llmprune bench --device cpu`: kernel and end-to-end speed of a pruned model on a CPU.

Per linear shape and token count: dense F.linear in float32 and in bfloat16, torch's sparse CSR product (what a
user would try first), and ours with float32 and bfloat16 values (the latter with float32 activations and, as in a
model loaded in bfloat16, with bfloat16 ones: `ours_bfloat16_model`). Each figure is the median over passes that call
it once on each of several weight copies (more bytes than the last-level cache holds, so weights come from memory
as they do in a model), after a warm-up pass. Then greedy decode tokens/s of the dense model and of the
sparsified one, and where a decode step's time goes (the linears, the rest of torch's operators, Python).
"""
from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from llmprune import cpu_kernels, deploy
from llmprune.models import cache_keyword, get_weight, returned_cache

TOKENS = (1, 4, 16, 512)
VALUE_DTYPES = (torch.float32, torch.bfloat16)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache() -> int:
    """Bytes of the largest cache the first CPU reports (32 MiB where none is found)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def copy_gbs() -> float:
    """Memory copy bandwidth (bytes read + written per second) of a 256 MiB tensor, median of 5."""
    src = torch.randn(2**26)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / time_passes([lambda: dst.copy_(src)], repeats=5) / 1e9


def environment() -> dict:
    import transformers

    flags = set()
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        flags = set(line.partition(":")[2].split())
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": torch.get_num_threads(), "kernel_isa": cpu_kernels.best_isa(), "vendor": cpu_kernels.cpu_vendor(),
            "fp32_expansion": cpu_kernels.fp32_expansion(), "bf16_dot_parts": cpu_kernels.bf16_dot_parts(),
            "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags,
            "llc_mib": round(last_level_cache() / 2**20, 1), "copy_gbs": round(copy_gbs(), 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def time_passes(calls: list, *, repeats: int = 20, budget_s: float = 2.0) -> float:
    """Median seconds per call over passes that run every call once (one warm-up pass); fewer passes where one
    pass takes long, at least 3."""
    start = time.perf_counter()
    for call in calls:
        call()
    first = time.perf_counter() - start
    passes = max(3, min(repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - start) / len(calls))
    return statistics.median(times)


def shape_rows(W: torch.Tensor, *, tokens=TOKENS, repeats: int = 20, value_dtypes=VALUE_DTYPES) -> list[dict]:
    """Every contender on one pruned float32 weight W [rows, cols], per token count."""
    rows, cols = W.shape
    W = W.float()
    copies = max(2, min(8, math.ceil(3 * last_level_cache() / (W.numel() * 2))))
    dense = [W.clone() for _ in range(copies)]
    dense16 = [w.to(torch.bfloat16) for w in dense]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = [w.to_sparse_csr() for w in dense]
    ours = {dt: [cpu_kernels.pack_rows(w, dt) for w in dense] for dt in value_dtypes}
    kept = int(torch.count_nonzero(W))
    out = []
    for n in tokens:
        xs = [torch.randn(n, cols) for _ in range(copies)]
        xs16 = [x.to(torch.bfloat16) for x in xs]
        row = {"shape": [rows, cols], "sparsity": 1 - kept / W.numel(), "tokens": n, "copies": copies,
               "method": cpu_kernels.method_for(n, kept / W.numel())}
        row["dense_s"] = time_passes([lambda i=i: nn.functional.linear(xs[i], dense[i]) for i in range(copies)], repeats=repeats)
        row["dense_bf16_s"] = time_passes([lambda i=i: nn.functional.linear(xs16[i], dense16[i]) for i in range(copies)],
                                          repeats=repeats)
        row["csr_s"] = time_passes([lambda i=i: torch.mm(csr[i], xs[i].T) for i in range(copies)], repeats=repeats)
        io = 4 * n * (rows + cols)
        row["dense_gbs"] = (W.numel() * 4 + io) / row["dense_s"] / 1e9
        expected = xs[0].double() @ W.double().T
        for dt, packs in ours.items():
            name = "ours_" + str(dt).removeprefix("torch.")
            row[f"{name}_s"] = time_passes([lambda i=i: cpu_kernels.matmul(xs[i], *packs[i], cols) for i in range(copies)],
                                           repeats=repeats)
            stored = sum(t.numel() * t.element_size() for t in packs[0])
            row[f"{name}_gbs"] = (stored + io) / row[f"{name}_s"] / 1e9
            row[f"{name}_speedup"] = row["dense_s"] / row[f"{name}_s"]
            got = cpu_kernels.matmul(xs[0], *packs[0], cols).double()
            want = expected if dt == torch.float32 else xs[0].double() @ cpu_kernels.unpack_rows(*packs[0], cols).double().T
            row[f"{name}_rel_err"] = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if dt != torch.float32:  # a model loaded in the values' dtype: its activations come in that dtype too
                xl = [x.to(dt) for x in xs]
                row[f"{name}_model_s"] = time_passes(
                    [lambda i=i: cpu_kernels.matmul(xl[i], *packs[i], cols) for i in range(copies)], repeats=repeats)
                row[f"{name}_model_speedup"] = row["dense_s"] / row[f"{name}_model_s"]
                row[f"{name}_model_over_bf16"] = row["dense_bf16_s"] / row[f"{name}_model_s"]
                row[f"{name}_model_method"] = cpu_kernels.method_for(n, kept / W.numel(), bf16=dt == torch.bfloat16)
        out.append(row)
    return out


def kernel_table(model: nn.Module, **kwargs) -> list[dict]:
    """One block of rows per distinct shape of the model's pruned linears (the first weight of each shape)."""
    seen: dict[tuple, torch.Tensor] = {}
    for _, _, module in deploy.pruned_linears(model):
        W = get_weight(module).detach()
        seen.setdefault(tuple(W.shape), W)
    rows = []
    for W in seen.values():
        rows += shape_rows(W.to("cpu"), **kwargs)
    return rows


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, float, list]:
    """(prefill seconds, decode tokens/s, generated ids) of a greedy loop over the KV cache, as generate() runs."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - start
    kw = cache_keyword(model)
    past, step = returned_cache(out), out.logits[:, -1:].argmax(-1)
    generated = [step]
    start = time.perf_counter()
    for _ in range(tokens - 1):
        out = model(input_ids=step, use_cache=True, **{kw: past})
        past, step = returned_cache(out), out.logits[:, -1:].argmax(-1)
        generated.append(step)
    decode = time.perf_counter() - start
    return prefill, (tokens - 1) / decode, torch.cat(generated, 1)[0].tolist()


@torch.no_grad()
def step_breakdown(model: nn.Module, ids: torch.Tensor, steps: int = 16) -> dict:
    """Where a decode step's time goes: the decoder blocks' linears and the output head (each timed by hooks),
    torch's other operators (the profiler's self time, less the linears'), and the rest (Python, the model's glue):
    seconds per step."""
    from torch.profiler import ProfilerActivity, profile

    linear_types = (nn.Linear, deploy.SparseLinear)
    spent = [0.0, 0.0]  # the blocks' linears, the head
    starts: dict[int, float] = {}
    head = model.get_output_embeddings()

    def before(module, args):
        starts[id(module)] = time.perf_counter()

    def after(module, args, output):
        spent[module is head] += time.perf_counter() - starts.pop(id(module))

    handles = []
    for module in model.modules():
        if isinstance(module, linear_types):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        kw = cache_keyword(model)
        out = model(input_ids=ids, use_cache=True)
        past, step = returned_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm
            out = model(input_ids=step, use_cache=True, **{kw: past})
            past, step = returned_cache(out), out.logits[:, -1:].argmax(-1)
        spent[:] = [0.0, 0.0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=step, use_cache=True, **{kw: past})
                past, step = returned_cache(out), out.logits[:, -1:].argmax(-1)
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    events = prof.key_averages()
    op_self = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    linear_ops = sum(e.self_cpu_time_total for e in events
                     if e.key in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")) / 1e6
    linears, head_s = spent
    others = max(0.0, op_self - linear_ops)
    return {"step_s": wall / steps, "linears_s": linears / steps, "head_s": head_s / steps, "other_ops_s": others / steps,
            "python_s": max(0.0, wall - linears - head_s - others) / steps, "note": "profiled (slower than the timed decode)"}


def decode_speed(model: nn.Module, *, tokens: int = 128, prompt: int = 64, value_dtypes=VALUE_DTYPES,
                 model_dtypes=(), seed: int = 0) -> dict:
    """Greedy decode (batch 1) of the model as loaded and sparsified per value dtype: tokens/s, the same tokens,
    and a step's breakdown. Each of `model_dtypes` (16-bit) adds the model cast to it, dense (`dense_bfloat16`)
    and sparsified with values in it (`ours_bfloat16_model`; its speedup over the float32 dense model, and
    `speedup_over_same_dtype` over the dense model in its dtype, whose tokens it is compared with)."""
    model = model.to("cpu").eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(seed))
    prefill, rate, dense_ids = greedy_decode(model, ids, tokens)
    result = {"prompt": prompt, "tokens": tokens, "dense": {"prefill_s": prefill, "tokens_per_s": rate,
                                                               "breakdown": step_breakdown(model, ids)}}
    for dt in value_dtypes:
        sparse = copy.deepcopy(model)
        report = deploy.sparsify(sparse, device="cpu", values_dtype=dt)
        prefill, rate, ids_out = greedy_decode(sparse, ids, tokens)
        result["ours_" + str(dt).removeprefix("torch.")] = {
            "prefill_s": prefill, "tokens_per_s": rate, "speedup": rate / result["dense"]["tokens_per_s"],
            "same_tokens": ids_out == dense_ids, "stored_over_dense": report["stored_bytes"] / max(report["dense_bytes"], 1),
            "swapped": report["swapped"], "dense_kernel": report["dense_kernel"], "breakdown": step_breakdown(sparse, ids)}
        del sparse
    for dt in model_dtypes:
        short = str(dt).removeprefix("torch.")
        cast = copy.deepcopy(model).to(dt)
        prefill, rate, cast_ids = greedy_decode(cast, ids, tokens)
        dense = result["dense_" + short] = {"prefill_s": prefill, "tokens_per_s": rate,
                                            "speedup": rate / result["dense"]["tokens_per_s"],
                                            "same_tokens": cast_ids == dense_ids, "breakdown": step_breakdown(cast, ids)}
        report = deploy.sparsify(cast, device="cpu", values_dtype=dt)
        prefill, rate, ids_out = greedy_decode(cast, ids, tokens)
        result[f"ours_{short}_model"] = {
            "prefill_s": prefill, "tokens_per_s": rate, "speedup": rate / result["dense"]["tokens_per_s"],
            "speedup_over_same_dtype": rate / dense["tokens_per_s"], "same_tokens": ids_out == cast_ids,
            "stored_over_dense": report["stored_bytes"] / max(report["dense_bytes"], 1), "swapped": report["swapped"],
            "dense_kernel": report["dense_kernel"], "breakdown": step_breakdown(cast, ids)}
        del cast
    return result
