"""What a checkpoint holds, without building its model (`llmprune info`): per-linear sparsity and N:M check, dense
and stored bytes, its layout and what loads it, the recipe, versions and evaluation recorded beside it; a plot of
per-block sparsity."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from llmprune import formats, quant
from llmprune.checkpoint import read_config, read_layout, read_report
from llmprune.errors import LlmpruneError
from llmprune.files import TensorReader, check_writable, weight_files
from llmprune.masks import Pattern, parse_pattern, pattern_holds


def loads_with(directory: str | Path) -> str:
    """What loads this checkpoint, for `llmprune info` and error messages."""
    layout = read_layout(directory)
    if layout is None:
        return "dense safetensors: loads anywhere (plain transformers, vLLM, llmprune)"
    if layout[1] == quant.PACK_FORMAT:
        scheme = quant.scheme_of(read_config(directory)["quantization_config"])
        return (f"compressed-tensors' pack-quantized layout ({scheme.describe()}): loads with plain transformers and "
                "compressed-tensors >= 0.15, vLLM and llmprune.load; pruned weights are stored as zero codes, so the "
                "sparsity is real in the values but takes no less space than other weights")
    if layout[0] == formats.LLMPRUNE:
        return ("llmprune's compressed layout: loads with llmprune.load, or with transformers' from_pretrained after "
                "`import llmprune`; plain transformers stops with an error naming llmprune. For tools without llmprune: "
                "llmprune convert DIR --format dense --out DENSE_DIR")
    return ("compressed-tensors 0.14's layout: loads with llmprune.load, or with transformers 4 and compressed-tensors <= 0.14; "
            "transformers with a newer compressed-tensors loads random weights into its pruned linears, so convert it: "
            "llmprune convert DIR --format compressed --out DIR2")


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise LlmpruneError(f"'{directory}' is not a directory; pass a model directory (config.json + *.safetensors).")
    if not (directory / "config.json").is_file():
        raise LlmpruneError(f"{directory} has no config.json, so it is not a model directory; pass the directory that "
                            "holds the model's config.json and *.safetensors.")
    if not weight_files(directory):
        if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
            raise LlmpruneError(f"{directory} holds only pickle weights (.bin/.pt), which llmprune does not open; "
                                "convert them to safetensors with transformers' save_pretrained(safe_serialization=True).")
        raise LlmpruneError(f"{directory} holds no .safetensors weights; is it a model directory?")


def describe(directory: str | Path) -> dict:
    """Per-linear sparsity, pattern check and sizes; totals; layout and what loads it; recipe, versions and eval
    from llmprune.json."""
    directory = Path(directory)
    _check_directory(directory)
    declared = read_layout(directory)
    fmt = declared[1] if declared else formats.DENSE
    report = read_report(directory)
    pattern = _declared_pattern(report, directory)
    params = formats.PARAMS.get(fmt, ())
    scheme = None
    if fmt == quant.PACK_FORMAT:
        scheme = quant.scheme_of(read_config(directory)["quantization_config"])
        params = (quant.PACKED, quant.SCALE, quant.SHAPE, quant.ZERO)

    linears: dict[str, dict] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other_bytes = 0
    for file in weight_files(directory):
        with TensorReader(file) as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                prefix, _, suffix = key.rpartition(".")
                if suffix in params:
                    groups.setdefault(prefix, {})[suffix] = tensor
                elif suffix == "weight" and tensor.dim() == 2 and "embed" not in prefix:
                    linears[prefix] = _entry(prefix, tensor, tensor.numel() * tensor.element_size(), pattern)
                else:
                    other_bytes += tensor.numel() * tensor.element_size()
    for prefix, parts in groups.items():
        stored = formats.stored_bytes(parts)
        if scheme is not None:
            linears[prefix] = _entry(prefix, quant.unpack_quantized(parts, scheme, prefix), stored, pattern)
            continue
        prefix = prefix[: -len(".weight")] if prefix.endswith(".weight") else prefix  # older "X.weight.bitmask" naming
        W = formats.decompress(fmt, parts, prefix)
        if W.dim() == 2:
            linears[prefix] = _entry(prefix, W, stored, pattern)
            continue
        experts = W.reshape(-1, *W.shape[-2:])  # a fused experts parameter: one row per expert, named as llmprune.json does
        for e, We in enumerate(experts):
            linears[f"{prefix}.{e}"] = _entry(f"{prefix}.{e}", We, stored // len(experts), pattern)
    if not linears:
        raise LlmpruneError(f"{directory} holds no 2-D linear weights; is it a causal LM checkpoint?")

    rows = [linears[k] for k in sorted(linears, key=_natural)]
    dense_linear = sum(r["dense_bytes"] for r in rows)
    stored_linear = sum(r["stored_bytes"] for r in rows)
    files_bytes = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    zeros = sum(r["zeros"] for r in rows)
    numel = sum(r["numel"] for r in rows)
    failing = [r["name"] for r in rows if r.get("pattern_ok") is False]
    return {
        "directory": str(directory),
        "format": fmt,
        "layout": declared[0] if declared else "dense",
        "loads_with": loads_with(directory),
        "pattern": str(pattern) if pattern else None,
        "pattern_ok": None if pattern is None else not failing,
        "pattern_failures": failing,
        "linears": rows,
        "sparsity": zeros / numel,
        "sizes": {
            "linear_dense_bytes": dense_linear,
            "linear_stored_bytes": stored_linear,
            "linear_ratio": stored_linear / dense_linear,
            "directory_bytes": files_bytes,
            "directory_dense_bytes": files_bytes - stored_linear + dense_linear,
            "directory_ratio": files_bytes / (files_bytes - stored_linear + dense_linear),
        },
        "quantization": None if scheme is None else _quantization(scheme, [linears[p] for p in groups]),
        "recipe": report.get("recipe"),
        "experts": [{k: r.get(k) for k in ("name", "tokens", "fallback", "sparsity")}
                    for r in report.get("linears", []) if r.get("tokens") is not None or r.get("fallback")],
        "versions": report.get("versions"),
        "eval": report.get("eval"),
    }


def _quantization(scheme: quant.QuantScheme, rows: list[dict]) -> dict:
    """Bits per weight and sparsity over the quantized linears."""
    numel = sum(r["numel"] for r in rows)
    return {"scheme": scheme.describe(), "linears": len(rows),
            "bits_per_weight": 8 * sum(r["stored_bytes"] for r in rows) / numel,
            "sparsity_kept": sum(r["zeros"] for r in rows) / numel}


def _entry(name: str, W: torch.Tensor, stored: int, pattern: Pattern | None) -> dict:
    zeros = int((W == 0).sum())
    entry = {"name": name, "shape": list(W.shape), "dtype": str(W.dtype).replace("torch.", ""), "numel": W.numel(),
             "zeros": zeros, "sparsity": zeros / W.numel(), "dense_bytes": W.numel() * W.element_size(),
             "stored_bytes": stored}
    if pattern is not None and pattern.structured and zeros:
        entry["pattern_ok"] = pattern_holds(W, pattern)
    return entry


def _declared_pattern(report: dict, directory: Path) -> Pattern | None:
    recipe = report.get("recipe") or {}
    if recipe.get("pattern"):
        return parse_pattern(recipe["pattern"])
    qc = (read_config(directory) or {}).get("quantization_config")
    if isinstance(qc, dict):
        structure = qc.get("sparsity_structure") or (qc.get("sparsity_config") or {}).get("sparsity_structure")
        if structure and re.fullmatch(r"\d+:\d+", structure) and structure != "0:0":
            return parse_pattern(structure)
    return None


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def per_block_sparsity(info: dict) -> list[tuple[int, float]]:
    """(block index, sparsity of its linears) in block order."""
    blocks: dict[int, list[int]] = {}
    for row in info["linears"]:
        match = re.search(r"\.(\d+)\.", row["name"])
        if match:
            acc = blocks.setdefault(int(match.group(1)), [0, 0])
            acc[0] += row["zeros"]
            acc[1] += row["numel"]
    return [(i, z / n) for i, (z, n) in sorted(blocks.items())]


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot(info: dict, path: str | Path) -> Path:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise LlmpruneError(f"--plot {path}: {'a name without an extension' if not suffix else f'.{suffix} is not an image format'}; "
                            f"end the file name in one of {', '.join('.' + f for f in PLOT_FORMATS)}.")
    if Path(path).is_dir():
        raise LlmpruneError(f"--plot {path} is a directory; pass a file name such as {Path(path) / 'sparsity.png'}.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlmpruneError("--plot needs matplotlib; run: pip install matplotlib.") from None
    points = per_block_sparsity(info)
    if not points:
        raise LlmpruneError("no numbered decoder blocks found to plot.")
    fig, ax = plt.subplots(figsize=(max(6, len(points) * 0.25), 3.2))
    ax.bar([i for i, _ in points], [s * 100 for _, s in points], color="#4c72b0")
    ax.axhline(info["sparsity"] * 100, color="#c44e52", linestyle="--", linewidth=1, label=f"overall {info['sparsity']:.1%}")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(Path(info["directory"]).name)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = check_writable(path, "--plot")
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise LlmpruneError(f"could not write --plot {path} ({exc.strerror or exc}); choose another file.") from None
    finally:
        plt.close(fig)
    return path
