"""CPU kernels for pruned weights: the row bitmask layout, packed in torch, its arithmetic in torch (the reference
the tests hold the kernels to), compilation on first use for the CPU at hand, and the calls.

Layout (`pack_rows`), any sparsity (unstructured or N:M): per row a bitmask of its inputs (1 bit a weight,
inputs padded to a multiple of 64) and its kept values, row after row, in float32, bfloat16 or float16. A
50%-sparse float32 weight moves 2.125 bytes a weight instead of 4; with bfloat16 values 1.125.

The C++ (kernels/bitmask_cpu.cpp) is compiled once per machine and torch version with torch's cpp_extension
into a cache folder; it holds code for AVX-512F, AVX2 + FMA + F16C and the baseline ISA, and, for bf16 values with
bf16 or fp16 inputs at 1-8 tokens, bf16 dot products (AVX-512 BF16 + VBMI2, the inputs split into exact bf16
parts), and picks by what the CPU reports at run time. Up to EXPAND_TOKENS tokens the weights are expanded in registers (decode, bound by
memory); up to GATHER_TOKENS only the kept values are multiplied, broadcast over the tokens; beyond, the rows are
expanded to a dense block for torch's GEMM (prefill), which measured the fastest there (README, "CPU kernels").
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCE, BODY, COMMON = "bitmask_cpu.cpp", "bitmask_cpu_body.h", "cpu_common.h"
ISAS = ("portable", "avx2", "avx512", "avx512bf16")  # the C++ side's numbering; each level runs the ones below it
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_ALIGN = 64  # inputs per row are padded to this (the gather kernel reads the mask 64 bits at a time)
VALUE_PAD = 16  # trailing zeros after the last row's values, for full-vector loads
# 1..EXPAND_TOKENS tokens: expand in registers; up to GATHER_TOKENS (with AVX-512 on an AMD CPU, any number where at
# most GATHER_DENSITY of the weight is kept): multiply the kept values only; beyond: row blocks expanded for torch's
# GEMM (measured on an AMD Zen 5 with AVX-512, a Zen 3 with AVX2 only and an Intel Xeon with AVX-512, 2 cores each:
# README "CPU kernels". Gathering 512 tokens at 30% density ran at 1.65x dense on the Zen 5 but 0.43-0.84x with 8-lane
# vectors and 0.18-0.20x on the Xeon, so beyond GATHER_TOKENS the density rule holds on AMD AVX-512 only)
EXPAND_TOKENS = 6
GATHER_TOKENS = 128
GATHER_DENSITY = 0.4
# The expanded row block of method "dense" (measured best at 2-8 MiB on an AMD Zen 5 and 8-16 MiB on an Intel Xeon,
# 512 tokens, eval/ab_prefill_blocks.py: 32 MiB blocks up to 9% and the whole weight at once 11-25% slower there, though
# they read the input fewer times)
BLOCK_BYTES = 8 << 20
# bf16 activations and values where the CPU has AVX-512 BF16: bf16 dot products up to BF16_EXPAND_TOKENS tokens (one
# pass over the weight), beyond it bf16 row blocks for torch's bf16 GEMM, the dense bf16 model's own (on the Xeon with
# AMX, 4096x4096 and 11008x4096 at 50%/70%: dot products 1.14-1.23x dense bf16 at 6 tokens, 0.91-0.98x at 8, 0.47-0.50x
# at 16, where the bf16 GEMM blocks run at 0.59-0.66x, gathering at 0.37-0.49x; 0.90-1.01x at 128-512 tokens).
BF16_EXPAND_TOKENS = 8
# Their bf16 row blocks: 16 MiB (the Xeon, 50%, 128 / 512 tokens: 3.50 / 8.92 ms on 2048x8192 against 4.01 / 16.91 with
# 8 MiB and 10.3 / 15.4 with 32 MiB; within 1-5% of the best on 4096x4096 and 11008x4096; rounds alternated in one process)
BF16_BLOCK_BYTES = 16 << 20


def source_dir() -> Path:
    from llmprune.kernels import source_dir as kernels_dir

    return kernels_dir()


# ---- layout (pure torch) ----------------------------------------------------------------------------------


def padded_cols(cols: int) -> int:
    return -(-cols // ROW_ALIGN) * ROW_ALIGN


def pack_rows(W: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """W [rows, cols] → (values [kept + VALUE_PAD] in `dtype` (W's by default), masks uint8 [rows, kp / 8],
    offsets int64 [rows + 1]). Bit j of mask byte c flags input 8c + j; kp = cols rounded up to ROW_ALIGN.
    A weight is kept where W is non-zero (a value that rounds to zero in `dtype` is still stored)."""
    dtype = dtype or W.dtype
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"values must be one of {VALUE_DTYPES}; got {dtype}")
    rows, cols = W.shape
    W = W.detach().to("cpu")
    kp = padded_cols(cols)
    keep = torch.zeros(rows, kp, dtype=torch.bool)
    keep[:, :cols] = W != 0
    weights = 1 << torch.arange(8, dtype=torch.int32)
    masks = (keep.view(rows, kp // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(keep.sum(1), 0)
    values = torch.zeros(int(offsets[-1]) + VALUE_PAD, dtype=dtype)
    values[: int(offsets[-1])] = W[keep[:, :cols]].to(dtype)
    return values, masks.contiguous(), offsets


def unpack_rows(values: Tensor, masks: Tensor, offsets: Tensor, cols: int) -> Tensor:
    """The dense [rows, cols] weight of pack_rows' output, in the values' dtype."""
    rows, kb = masks.shape
    bits = (masks.view(rows, kb, 1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    keep = bits.view(rows, kb * 8).bool()
    dense = values.new_zeros(rows, kb * 8)
    dense[keep] = values[: int(offsets[-1])]
    return dense[:, :cols]


def reference(values: Tensor, masks: Tensor, offsets: Tensor, x: Tensor, cols: int) -> Tensor:
    """y = x Wᵀ in float32 from the row layout: what the kernels compute."""
    return x.float() @ unpack_rows(values, masks, offsets, cols).float().T


# ---- compilation -------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where compiled kernels live: $LLMPRUNE_KERNEL_CACHE, else ~/.cache/llmprune/kernels (XDG_CACHE_HOME honoured)."""
    if os.environ.get("LLMPRUNE_KERNEL_CACHE"):
        return Path(os.environ["LLMPRUNE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmprune" / "kernels"


def _build_key(sources: tuple[str, ...] = (SOURCE, BODY, COMMON)) -> str:
    """Sources, torch and Python versions: a compiled module is reused only where all three match."""
    digest = hashlib.sha256()
    for name in sources:
        digest.update((source_dir() / name).read_bytes())
    digest.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return digest.hexdigest()[:12]


_refusal: str | None = None


def compile_module(stem: str, sources: tuple[str, ...], what: str):
    """kernels/sources[0] (including the others) built with torch's cpp_extension into cache_dir()/stem-KEY on first
    use, loaded from there after: (module, None), or (None, why in one line) where no C++ compiler is found or the
    build fails. `what` names the kernels in messages."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ('{compiler}') is on PATH to build {what}; install g++ or clang++"
    from torch.utils import cpp_extension

    key = _build_key(sources)
    build = cache_dir() / f"{stem}-{key}"
    try:
        build.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return None, f"cannot create the kernel cache {build} ({err.strerror}); set LLMPRUNE_KERNEL_CACHE to a writable folder"
    fresh = not any(build.glob("*.so"))
    started = time.perf_counter()
    if fresh:
        log.info("compiling %s for this machine (once; cached in %s)", what, build)
    # OpenMP: at::parallel_for runs on torch's pool only in code built with it (torch ships the same libgomp)
    refusal = None
    for flags in (["-fopenmp"], []):
        try:
            module = cpp_extension.load(name=f"llmprune_{stem.replace('-', '_')}_{key}", sources=[str(source_dir() / sources[0])],
                                        extra_cflags=["-O3", "-std=c++17", *flags], extra_ldflags=flags,
                                        extra_include_paths=[str(source_dir())], build_directory=str(build), verbose=False)
        except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            refusal = f"{what} failed to build ({first[:200]})"
            log.debug("%s build failed with flags %s", what, flags, exc_info=True)
            continue
        if not module.threaded():
            log.warning("%s were built without OpenMP (the compiler refused -fopenmp): they run on one thread", what)
        if fresh:
            log.info("%s compiled in %.0f s", what, time.perf_counter() - started)
        return module, None
    return None, refusal


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled module (built on first use, then loaded from the cache), or None where it cannot be built
    (no C++ compiler, a failed build): `refusal()` then says why in one line."""
    global _refusal
    module, _refusal = compile_module("cpu", (SOURCE, BODY, COMMON), "the CPU kernels")
    if module is not None:
        configure(module)
    return module


GPTQ_SOURCE = "gptq_cpu.cpp"


@functools.lru_cache(maxsize=1)
def gptq_extension():
    """The compiled GPTQ column loop (kernels/gptq_cpu.cpp), or None: no compiler, a failed build, or
    LLMPRUNE_GPTQ_KERNEL=0 in the environment; GPTQ then runs its loop in torch (the same rounding)."""
    if os.environ.get("LLMPRUNE_GPTQ_KERNEL", "1") == "0":
        return None
    module, why = compile_module("gptq", (GPTQ_SOURCE, COMMON), "the CPU GPTQ kernel")
    if module is None:
        log.info("GPTQ's column loop runs in torch: %s", why)
    return module


def configure(module) -> None:
    """Set a freshly built kernel module's per-vendor choices (fp32 expansion, bf16 dot parts) as this process
    runs them; modules built from older sources lack some setters and keep their defaults there."""
    vendor = module.cpu_vendor()
    module.set_fp32_expand_load(_fp32_expand_load(vendor))
    if hasattr(module, "set_bf16_max_parts"):
        module.set_bf16_max_parts(_bf16_max_parts(vendor))


def _fp32_expand_load(vendor: str) -> bool:
    """Whether the AVX-512 kernels expand fp32 values with vexpandps from memory (measured faster on an Intel Xeon)
    rather than by two table permutations (faster on AMD Zen 5): $LLMPRUNE_CPU_FP32_EXPAND ('load' or 'permute')
    decides where set, else the CPU's vendor."""
    forced = os.environ.get("LLMPRUNE_CPU_FP32_EXPAND")
    if forced in ("load", "permute"):
        return forced == "load"
    if forced:
        log.warning("LLMPRUNE_CPU_FP32_EXPAND=%s is neither 'load' nor 'permute'; deciding by the CPU's vendor", forced)
    return vendor == "intel"


def _bf16_max_parts(vendor: str) -> int:
    """How many bf16 parts of x the AVX-512 BF16 dot products take with bf16 values: 3 lets fp32 activations (x =
    x1 + x2 + x3 exactly) through them, measured 1.05-1.52x faster than the AVX-512F expansion at one token on an AMD
    EPYC Zen 4 and slower on an Intel Xeon, so 2 there. $LLMPRUNE_CPU_BF16_PARTS ('2' or '3') decides where set."""
    forced = os.environ.get("LLMPRUNE_CPU_BF16_PARTS")
    if forced in ("2", "3"):
        return int(forced)
    if forced:
        log.warning("LLMPRUNE_CPU_BF16_PARTS=%s is neither '2' nor '3'; deciding by the CPU's vendor", forced)
    return 3 if vendor == "amd" else 2


def bf16_dot_parts() -> int:
    """The most bf16 parts of x the AVX-512 BF16 kernels take as dot products in this process (2 or 3)."""
    module = extension()
    return module.bf16_max_parts() if module is not None else 2


def set_bf16_dot_parts(parts: int) -> None:
    """Let fp32 activations (3 parts) through the AVX-512 BF16 dot products, or not (2); the outputs differ only
    in the order of fp32 sums."""
    if parts not in (2, 3):
        raise ValueError(f"bf16 dot parts {parts} is neither 2 nor 3")
    module = extension()
    if module is None:
        raise RuntimeError(refusal())
    module.set_bf16_max_parts(parts)


def cpu_vendor() -> str:
    """'intel', 'amd' or 'other' (what the CPU reports; 'other' where the kernels cannot be built)."""
    module = extension()
    return module.cpu_vendor() if module is not None else "other"


def fp32_expansion() -> str:
    """How the AVX-512 kernels expand fp32 values in this process: 'load' (vexpandps) or 'permute'."""
    module = extension()
    return "load" if module is not None and module.fp32_expand_load() else "permute"


def set_fp32_expansion(how: str) -> None:
    """Choose the AVX-512 fp32 expansion for this process ('load' or 'permute'); both give identical outputs."""
    if how not in ("load", "permute"):
        raise ValueError(f"fp32 expansion '{how}' is neither 'load' nor 'permute'")
    module = extension()
    if module is None:
        raise RuntimeError(refusal())
    module.set_fp32_expand_load(how == "load")


def refusal() -> str | None:
    """Why the CPU kernels cannot run here (None when they can)."""
    extension()
    return _refusal


def best_isa() -> str:
    """The widest instruction set this CPU runs our kernels with: 'avx512bf16' (AVX-512 with BF16 dot products and
    VBMI2: bf16 values at 1-8 tokens take vdpbf16ps), 'avx512', 'avx2' or 'portable'."""
    module = extension()
    return ISAS[module.best_isa()] if module is not None else "portable"


def available_isas() -> list[str]:
    return list(ISAS[: ISAS.index(best_isa()) + 1]) if extension() is not None else []


def _isa(isa: str | None) -> int:
    if isa is None:
        return _default_code()
    if isa not in available_isas():
        raise ValueError(f"instruction set '{isa}' is not available here (available: {', '.join(available_isas()) or 'none'})")
    return ISAS.index(isa)


@functools.lru_cache(maxsize=1)
def _default_code() -> int:
    return ISAS.index(_default_isa())


@functools.lru_cache(maxsize=1)
def _default_vendor() -> str:
    return cpu_vendor()  # asked once: method_for runs on every call


@functools.lru_cache(maxsize=1)
def _default_isa() -> str:
    forced = os.environ.get("LLMPRUNE_CPU_ISA")
    if forced:
        if forced not in available_isas():
            log.warning("LLMPRUNE_CPU_ISA=%s is not available here; using %s", forced, best_isa())
            return best_isa()
        return forced
    return best_isa()


# ---- calls -------------------------------------------------------------------------------------------------


def method_for(tokens: int, density: float = 0.5, isa: str | None = None, vendor: str | None = None, *,
               bf16: bool = False) -> str:
    """The path a call with this many tokens takes on a weight keeping `density` of its entries with the kernels of
    `isa` on a CPU of `vendor` (defaults: this machine's), `bf16` where activations and values are both bfloat16:
    'expand', 'gather' or 'dense' (README, "CPU kernels", has the measurements these thresholds come from)."""
    if bf16 and (isa or _default_isa()) == "avx512bf16":
        return "expand" if tokens <= BF16_EXPAND_TOKENS else "dense"
    if tokens <= EXPAND_TOKENS:
        return "expand"
    if tokens <= GATHER_TOKENS:
        return "gather"
    wide = (isa or _default_isa()).startswith("avx512") and (vendor or _default_vendor()) == "amd"
    return "gather" if wide and density <= GATHER_DENSITY else "dense"


def block_rows(kp: int, itemsize: int = 4) -> int:
    """Rows a block of method 'dense' expands for inputs of `kp` (padded) features, `itemsize` bytes a weight (2: the
    bf16 blocks for torch's bf16 GEMM)."""
    return max(16, (BLOCK_BYTES if itemsize == 4 else BF16_BLOCK_BYTES) // (itemsize * kp))


def matmul(x: Tensor, values: Tensor, masks: Tensor, offsets: Tensor, cols: int, *, method: str | None = None,
           isa: str | None = None, density: float | None = None) -> Tensor:
    """y = x Wᵀ on the CPU for x [..., cols] of any float dtype (float32 sums; y in x's dtype). `density` (the
    kept fraction; read from `offsets` where not given) picks the path with the token count, unless `method`.
    Method 'dense' with bf16 x and values on a CPU with AVX-512 BF16 runs torch's bf16 GEMM, as the dense bf16 model
    would (oneDNN's sums are float32 too; the result is rounded to bf16 as the dense model's is)."""
    module = extension()
    if module is None:
        raise RuntimeError(refusal())
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {cols}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, cols)  # inference only: no gradient flows through the kernels (torch's out= GEMM refuses one)
    tokens, rows, kp = x2.shape[0], masks.shape[0], masks.shape[1] * 8
    code = _isa(isa)
    bf16 = x2.dtype == values.dtype == torch.bfloat16
    if method is None:
        method = method_for(tokens, density if density is not None else int(offsets[-1]) / max(1, rows * cols), ISAS[code],
                            bf16=bf16)
    if tokens == 0:
        y = x2.new_zeros(0, rows)
    elif method in ("dense", "expand"):
        # bf16 activations and values on a CPU with bf16 arithmetic: bf16 blocks for torch's bf16 GEMM (the dense
        # model's own). fp16 stays on the fp32 GEMM, which measured as fast as torch's fp16 one on the Xeon.
        same = method == "dense" and bf16 and ISAS[code] == "avx512bf16"
        xp = x2 if same else x2.to(torch.float32)
        if kp != cols or xp.stride(-1) != 1:
            xp = torch.nn.functional.pad(xp, (0, kp - cols)) if kp != cols else xp.contiguous()
        if method == "dense":
            y = module.matmul_blocked(xp, values, masks, offsets, code, block_rows(kp, xp.element_size()))
        else:
            y = module.matmul_expand(xp, values, masks, offsets, code)
    elif method == "gather":
        width = 16 if ISAS[code].startswith("avx512") else 8
        tp = -(-tokens // width) * width
        xT = x2.new_zeros(kp, tp, dtype=torch.float32)
        xT[:cols, :tokens] = x2.T
        y = module.matmul_gather(xT, values, masks, offsets, code)[:, :tokens].T
    else:
        raise ValueError(f"unknown method '{method}' (expand, gather or dense)")
    return y.to(x.dtype).reshape(*lead, rows)


# A linear left dense (the tied lm_head, linears a recipe ignored) runs through matmul_dense up to this many tokens
# where dense_kernel_wanted(): on an AMD EPYC Zen 4 (2 cores) SmolLM2's 49152×576 head took 3.6-3.8 ms at one
# token against 12-15 ms in torch's F.linear (MKL reads 7-10 GB/s there), 4.1 against 25 at 4 tokens, 10.3 against
# 34 at 16. Beyond it torch's GEMM, whose arithmetic then counts.
DENSE_TOKENS = 16


@functools.lru_cache(maxsize=1)
def dense_kernel_wanted() -> bool:
    """Whether linears left dense should run through matmul_dense at decode (where the kernels build: the caller's
    check): $LLMPRUNE_CPU_DENSE ('ours' or 'torch') decides where set; else on AMD CPUs, where it measured 3-6× torch's; elsewhere torch's (MKL on an Intel CPU
    streams near the copy rate, and ours was not measured there)."""
    forced = os.environ.get("LLMPRUNE_CPU_DENSE")
    if forced in ("ours", "torch"):
        return forced == "ours"
    if forced:
        log.warning("LLMPRUNE_CPU_DENSE=%s is neither 'ours' nor 'torch'; deciding by the CPU's vendor", forced)
    return _default_vendor() == "amd"


def matmul_dense(x: Tensor, weight: Tensor, *, isa: str | None = None) -> Tensor:
    """y = x Wᵀ for a dense CPU weight [rows, cols] (float32, bfloat16 or float16) and x [..., cols] of any float
    dtype, with float32 sums, y in x's dtype: one pass over the weight per 8 tokens, for decode."""
    module = extension()
    if module is None:
        raise RuntimeError(refusal())
    cols = weight.shape[1]
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {cols}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, cols).to(torch.float32)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.detach() if weight.stride(-1) == 1 else weight.detach().contiguous()
    return module.matmul_dense(x2, w, _isa(isa)).to(x.dtype).reshape(*lead, weight.shape[0])


def expand(values: Tensor, masks: Tensor, offsets: Tensor, cols: int, *, isa: str | None = None) -> Tensor:
    """The dense float32 weight [rows, cols], expanded by the compiled code."""
    module = extension()
    if module is None:
        raise RuntimeError(refusal())
    return module.expand(values, masks, offsets, _isa(isa))[:, :cols]
