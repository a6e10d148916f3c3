"""Save and load pruned model directories (safetensors + config + tokenizer + llmprune.json), atomically."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import logging

import torch
from torch import Tensor

from llmprune import formats
from llmprune.errors import LlmpruneError
from llmprune.files import (TensorReader, check_writable, read_header, read_json, return_freed_memory, weight_files,
                            write_tensors)

log = logging.getLogger(__name__)

REPORT_FILE = "llmprune.json"
SHARD_SIZE = "2GB"  # saved shards stay small, so rewriting one compressed holds little beside the model
OUTPUT_FORMATS = ("dense", "compressed", "compressed-tensors")
# what each output format writes: (config block, tensors); "compressed" is llmprune's own block (formats.py)
CONFIG_BLOCK = {"compressed": formats.LLMPRUNE, "compressed-tensors": formats.COMPRESSED_TENSORS}


CHECKPOINT_MARKERS = ("config.json", "llmprune.json", "recipe.yaml")  # what --overwrite may replace holds one of these


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Refuse an existing output path unless overwrite, an output that is or holds one of `inputs` (the model or
    checkpoint read: replacing it would destroy it), and, with overwrite, an existing directory that is neither
    empty nor a checkpoint (a model's config.json, llmprune's files, or safetensors); checked before any long work
    starts."""
    if not str(out).strip():
        raise LlmpruneError("--out is empty; pass the directory to write, e.g. --out pruned-model.")
    out = Path(out).expanduser()
    target = out.resolve()
    for given in inputs:
        if given is None or not str(given).strip() or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if source == target or target in source.parents:
            raise LlmpruneError(f"--out '{out}' {'is' if source == target else 'holds'} the input '{given}', which writing "
                                "it would destroy; choose another --out.")
    if out.exists() and not overwrite:
        raise LlmpruneError(f"output path '{out}' already exists; choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise LlmpruneError(f"output path '{out}' is a file; choose a directory path for --out.")
    if out.exists() and any(out.iterdir()) and not (any((out / name).exists() for name in CHECKPOINT_MARKERS)
                                                    or any(out.glob("*.safetensors"))):
        raise LlmpruneError(f"'{out}' holds files but no checkpoint, and --overwrite replaces only checkpoints (or "
                            "empty directories); choose another --out.")
    check_writable(out)
    return out


def check_format(fmt: str, *, warn: bool = False) -> str:
    """The --format, validated; warn=True (once, where a run starts) says what compressed-tensors' layout costs."""
    if fmt not in OUTPUT_FORMATS:
        raise LlmpruneError(f"unknown --format '{fmt}'; choose dense (zeros stored, loads anywhere), compressed "
                            "(smaller; loads with llmprune, or transformers after `import llmprune`) or compressed-tensors "
                            "(compressed-tensors 0.14's exact layout, for transformers 4 with compressed-tensors <= 0.14).")
    if warn and fmt == "compressed-tensors":
        log.warning("writing compressed-tensors 0.14's layout: transformers with compressed-tensors 0.15 or newer loads it "
                    "with random weights in the pruned linears; --format compressed is the layout that never loads wrong")
    return fmt


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary sibling of `out` to fill; it becomes `out` only if the block completes."""
    out = check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model, tokenizer, out: str | os.PathLike, *, report: dict, fmt: str = "compressed",
         pruned: set[str] | None = None, overwrite: bool = False, files: dict[str, str] | None = None,
         scheme=None) -> Path:
    """Write the model to `out`: dense (zeros where pruned) or compressed (pruned = names of the pruned linears,
    module paths or expert projections `EXPERTS.PARAM.E`, stored in a sparse layout: see OUTPUT_FORMATS), plus text
    `files` by name. A model quantized with `scheme` (its linears holding quant.SCALE buffers) is written in
    compressed-tensors' pack-quantized layout unless fmt is dense (then its dequantized weights). Atomic."""
    check_format(fmt)
    out = Path(out).expanduser()
    if scheme is not None:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            written = save_quantized(model, tmp, scheme, dense=fmt == "dense",
                                     structure=(report.get("recipe") or {}).get("pattern", "unstructured"))
            finish_directory(tmp, tokenizer=tokenizer, report=report, fmt="dense", pruned=set(), files=files,
                             written=written)
        return out
    with atomic_directory(out, overwrite=overwrite) as tmp:
        modules = dict(model.named_modules())
        experts = set(pruned or ()) - modules.keys()
        also = fused = layout = None
        if fmt != "dense" and experts:
            if CONFIG_BLOCK[fmt] == formats.LLMPRUNE:
                from llmprune import models

                fused = fused_experts(experts, lambda name: model.get_parameter(name).detach(),
                                      lambda name: models.stored_names(model, name))
            else:
                also = split_experts(model)
        if fmt != "dense" and pruned and also is None:  # chosen from the weights in memory, as they are saved
            weights = {t: modules[t].weight.detach() for t in pruned if t in modules}
            weights.update({name: get() for name, (get, _) in (fused or {}).items()})
            layout = formats.choose_format(weights) if weights else None
        direct = fmt != "dense" and bool(pruned) and not experts and layout is not None and all(
            isinstance(getattr(modules[name], "weight", None), torch.Tensor) for name in pruned)
        if not direct:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        finish_directory(tmp, tokenizer=tokenizer, report=report, fmt=fmt, pruned=(pruned or set()) & modules.keys(),
                         also=also, fused=fused, files=files, layout=layout, model=model if direct else None)
    return out


def fused_experts(names: set[str], tensor_of: Callable[[str], Tensor],
                  stored_keys: Callable[[str], list[str]]) -> dict[str, tuple[Callable[[], Tensor], list[str]]]:
    """For llmprune's layout, which stores a fused experts parameter whole: {parameter name: (a getter of its tensor,
    the names the dense checkpoint stores it under, one per expert)} for the parameters that hold the expert
    projections `names` (`EXPERTS.PARAM.E`) and have enough zeros to be worth compressing."""
    fused = {}
    for param_name in sorted({name.rpartition(".")[0] for name in names}):
        tensor = tensor_of(param_name)
        if _worth_compressing(tensor.reshape(-1, tensor.shape[-1])):
            fused[param_name] = (lambda param_name=param_name: tensor_of(param_name), stored_keys(param_name))
    return fused


def finish_directory(tmp: Path, *, tokenizer, report: dict, fmt: str, pruned: set[str], files: dict[str, str] | None,
                     also=None, fused=None, layout: str | None = None, model=None, written: dict | None = None) -> None:
    """Complete a directory that holds the dense shards and config.json: compress the pruned linears' weights
    (`P.weight` for P in pruned, as saved; `also` and `fused` as compress_directory takes them) unless fmt is dense, then the
    tokenizer, text `files` and llmprune.json. With `model`, the directory is empty yet and the model is written
    straight in the sparse layout (save_compressed_directly). `written`: the weights are already written in a
    compressed layout (save_quantized's account of them)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    report["format"] = fmt
    report["layout"] = "dense"
    if written is None and model is not None:  # the model in memory, its pruned linears plain modules: written compressed at once
        written = save_compressed_directly(model, tmp, pruned, layout, CONFIG_BLOCK[fmt])
    elif written is None and fmt != "dense" and (pruned or also is not None or fused):
        written = compress_directory(tmp, pruned, fmt=layout, also=also, fused=fused, block=CONFIG_BLOCK[fmt])
    if written is not None:
        report["format"] = written["format"]
        report["layout"] = written.get("layout", CONFIG_BLOCK.get(fmt))
        sizes = written["linears"]
        report["sizes"] = {"linear_dense_bytes": sum(s["dense_bytes"] for s in sizes.values()),
                           "linear_stored_bytes": sum(s["stored_bytes"] for s in sizes.values())}
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def save_dense(model, tokenizer, out: str | os.PathLike, *, report: dict, overwrite: bool = False) -> Path:
    return save(model, tokenizer, out, report=report, fmt="dense", overwrite=overwrite)


def convert(directory: str | os.PathLike, out: str | os.PathLike, *, fmt: str, overwrite: bool = False,
            allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Copy a checkpoint into the other layout; every weight keeps its exact bits (a quantized one's: the values
    its codes and scales give)."""
    from llmprune import models, quant

    check_format(fmt)
    source = Path(directory).expanduser()
    if not source.is_dir():
        raise LlmpruneError(f"'{directory}' is not a directory; pass a model directory.")
    if out is not None:
        check_output(out, overwrite=overwrite, inputs=(source,))  # never the input, nor a directory holding it
    model, tokenizer, _ = load_model(str(source), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    report = read_report(source)
    pruned = None
    if fmt != "dense":
        blocks_name, blocks = models.find_blocks(model)
        names = {name for i, block in enumerate(blocks) for name in models.find_linears(block, f"{blocks_name}.{i}")}
        modules = dict(model.named_modules())
        # store compressed only the linears whose zeros make the compressed layout smaller
        pruned = {n for n in names if _worth_compressing(models.get_weight(modules[n]))}
        pruned |= {p.name for i, block in enumerate(blocks) for p in models.find_linears(block, f"{blocks_name}.{i}", experts=True).values()
                    if isinstance(p, models.ExpertProjection) and _worth_compressing(p.weight_view)}
    report.setdefault("converted_from", str(source))
    layout = read_layout(source)
    if layout is not None and layout[1] == quant.PACK_FORMAT:
        scheme = quant.scheme_of(read_config(source)["quantization_config"])
        log.warning("%s is quantized (%s); %s stores its de-quantized weights (the same values, as %s), no longer "
                    "quantized and larger", source, scheme.describe(), out,
                    str(next(model.parameters()).dtype).removeprefix("torch."))
        report["dequantized_from"] = scheme.describe()
    written = save(model, tokenizer, out, report=report, fmt=fmt, pruned=pruned, overwrite=overwrite)
    size = sum(f.stat().st_size for f in weight_files(written))
    return {"source": str(source), "output": str(written), "format": report.get("format", fmt), "bytes": size}


def split_experts(model):
    """Which saved tensors hold pruned experts: transformers saves fused experts split per expert under names that
    are no module of the model (`...experts.3.gate_proj.weight`); those inside the blocks that have enough zeros."""
    from llmprune import models

    blocks_name, _ = models.find_blocks(model)
    modules = {name for name, _ in model.named_modules()}

    def chosen(key: str, W: Tensor) -> bool:
        return (key.startswith(blocks_name + ".") and key.endswith(".weight") and W.dim() == 2
                and key[: -len(".weight")] not in modules and _worth_compressing(W))
    return chosen


def _worth_compressing(W) -> bool:
    zeros = W.numel() - int(torch.count_nonzero(W))
    return zeros * W.element_size() > W.numel() / 8 + 8 * W.shape[0]


def record_eval(directory: str | os.PathLike, results: dict) -> bool:
    """Merge evaluation results into DIRECTORY/llmprune.json under "eval" (atomically).

    Perplexity entries are keyed by text and seqlen, task entries by task name, so runs accumulate
    instead of overwriting one another. Returns False (and writes nothing) where the directory holds
    no llmprune.json, i.e. is not an llmprune output.
    """
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        return False
    report = read_report(directory)
    section = report.setdefault("eval", {})
    for key in ("perplexity", "divergence"):
        for entry in results.get(key, []):
            kept = [e for e in section.get(key, []) if (e.get("text"), e.get("seqlen"), e.get("baseline")) !=
                    (entry.get("text"), entry.get("seqlen"), entry.get("baseline"))]
            section[key] = [*kept, entry]
    if results.get("tasks"):
        section.setdefault("tasks", {}).update(results["tasks"])
    for key in ("lm_eval", "versions"):
        if key in results:
            section[key] = results[key]
    tmp = path.with_name(f".{REPORT_FILE}.partial")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only model directory: the results were printed, only the record is lost
        tmp.unlink(missing_ok=True)
        log.warning("could not record the results in %s (%s)", path, exc.strerror or exc)
        return False
    return True

# ---- compressed checkpoints: reading, writing, building the model ----------------------------------


def read_config(directory: str | Path) -> dict | None:
    """config.json as a dict (None where there is none); damaged or not an object is a one-line error."""
    path = Path(directory) / "config.json"
    return read_json(path, "the checkpoint's config.json") if path.is_file() else None


REPORT_SHAPES = {"recipe": dict, "model": dict, "timings": dict, "versions": dict, "sizes": dict, "eval": dict,
                 "notes": list, "linears": list}  # llmprune.json's fields that readers take apart


def read_report(directory: str | Path) -> dict:
    """llmprune.json as a dict ({} where there is none); damaged (not JSON, or a field of the wrong kind) is a
    one-line error."""
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        return {}
    report = read_json(path, f"its {REPORT_FILE} (delete it to go on without the run's record)")  # a dict, or an error
    wrong = [key for key, kind in REPORT_SHAPES.items() if report.get(key) is not None and not isinstance(report[key], kind)]
    if wrong:
        raise LlmpruneError(f"{path} is damaged: its field '{wrong[0]}' is not a JSON "
                            f"{'object' if REPORT_SHAPES[wrong[0]] is dict else 'array'}; delete it to go on without "
                            "the run's record.")
    return report


def read_layout(directory: str | Path) -> tuple[str, str] | None:
    """(config block, tensor format) a checkpoint declares: (formats.LLMPRUNE | formats.COMPRESSED_TENSORS,
    sparse-bitmask | sparse-24-bitmask | dense); None for an ordinary dense checkpoint."""
    config = read_config(directory)
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method == formats.LLMPRUNE:
        fmt = qc.get("format")
        if fmt not in (formats.BITMASK, formats.SPARSE24):
            raise LlmpruneError(f"config.json of {directory} names the llmprune format '{fmt}', which this llmprune does not "
                                f"know; it reads {formats.BITMASK} and {formats.SPARSE24} (pip install -U llmprune).")
        if not isinstance(qc.get("layout_version"), int) or qc["layout_version"] > formats.LAYOUT_VERSION:
            raise LlmpruneError(f"{directory} has llmprune layout version {qc.get('layout_version')!r}; this llmprune reads "
                                f"up to {formats.LAYOUT_VERSION}: pip install -U llmprune.")
        return formats.LLMPRUNE, fmt
    if method != formats.COMPRESSED_TENSORS:
        return None
    if qc.get("config_groups"):
        from llmprune import quant

        quant.scheme_of(qc)  # one we read, or an error saying what is read
        return formats.COMPRESSED_TENSORS, quant.PACK_FORMAT
    sc = qc.get("sparsity_config") or {}
    fmt = sc.get("format", formats.DENSE) if isinstance(sc, dict) and sc else formats.DENSE
    if fmt not in formats.FORMATS:
        raise LlmpruneError(f"config.json of {directory} names the sparsity format '{fmt}', which llmprune does not know; "
                            f"it reads {', '.join(formats.FORMATS)}.")
    return formats.COMPRESSED_TENSORS, fmt


def read_format(directory: str | Path) -> str | None:
    """The sparse tensor format a checkpoint declares (None: an ordinary dense checkpoint)."""
    layout = read_layout(directory)
    return None if layout is None else layout[1]


# ---- safetensors ----------------------------------------------------------------------------------------


def read_state_dict(directory: str | Path, fmt: str) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, with compressed weights decompressed to `PATH.weight` (or, for a fused
    parameter stored whole, to `PATH`)."""
    from llmprune import quant

    files = weight_files(directory)
    if not files:
        raise LlmpruneError(f"{directory} holds no .safetensors weights; is it a model directory?")
    params = formats.PARAMS.get(fmt, ())
    scheme = None
    if fmt == quant.PACK_FORMAT:
        scheme = quant.scheme_of(read_config(directory)["quantization_config"])
        params = (quant.PACKED, quant.SCALE, quant.SHAPE, quant.ZERO)
    tensors: dict[str, Tensor] = {}
    for file in files:
        with TensorReader(file) as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    if not params:
        return tensors
    groups: dict[str, dict[str, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in params:
            groups.setdefault(prefix, {})[suffix] = value
        else:
            out[key] = value
    for prefix, parts in groups.items():
        if scheme is not None:
            out[f"{prefix}.weight"] = quant.unpack_quantized(parts, scheme, prefix)
            continue
        prefix = prefix[: -len(".weight")] if prefix.endswith(".weight") else prefix  # older "X.weight.bitmask" naming
        W = formats.decompress(fmt, parts, prefix)
        out[f"{prefix}.weight" if W.dim() == 2 else prefix] = W
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def compress_directory(directory: str | Path, pruned: set[str], fmt: str | None = None, also=None, fused=None,
                       block: str = formats.LLMPRUNE) -> dict:
    """Rewrite the dense safetensors of a saved model into a sparse layout: every `P.weight` with P in pruned (or for
    which also(key, tensor) holds) is stored compressed, and config.json gets the `block` (formats.LLMPRUNE or
    formats.COMPRESSED_TENSORS). `fused` maps a fused experts parameter's name to (a getter of its tensor, the
    per-expert names it is stored under): llmprune's block stores it whole, compressed under its own name, in place
    of those. llmprune's block writes the files under new names (formats.WEIGHTS_STEM; transformers must not find
    them by itself), compressed-tensors' in place. Reads one tensor at a time and holds one file's compressed
    tensors at most. Returns the format and sizes per compressed weight.

    `directory` must be a temporary directory the caller renames when complete (see checkpoint.py).
    """
    return_freed_memory()  # each weight's temporaries would otherwise stay resident beside the kept parts
    directory = Path(directory)
    fused = fused or {}
    files = weight_files(directory)
    dropped = {key: name for name, (_, keys) in fused.items() for key in keys}
    chosen: set[str] = set()
    linears: set[str] = set()
    home: dict[str, Path] = {}  # fused parameter -> the file that held its first stored tensor
    all_24 = True
    for file in files:  # first pass: which weights, and whether every one of them holds 2:4
        with TensorReader(file) as handle:
            for key in handle.keys():
                if key in dropped:
                    home.setdefault(dropped[key], file)
                    continue
                if not key.endswith(".weight") or len(handle.shape(key)) != 2:
                    continue
                stem = key[: -len(".weight")]
                linears.add(stem)
                W = handle.get_tensor(key) if also is not None or (stem in pruned and all_24 and fmt is None) else None
                if stem in pruned or (also is not None and also(key, W)):
                    chosen.add(stem)
                    all_24 = all_24 and fmt is None and formats.choose_format({stem: W}) == formats.SPARSE24
    if not set(pruned) <= chosen:
        raise ValueError(f"weights not found in the checkpoint: {sorted(set(pruned) - chosen)[:5]}")
    if set(fused) - home.keys():
        raise ValueError(f"stored experts not found in the checkpoint: {sorted(set(fused) - home.keys())[:5]}")
    if fmt is None:
        all_24 = all_24 and all(formats.choose_format({name: get()}) == formats.SPARSE24 for name, (get, _) in fused.items())
    fmt = fmt or (formats.SPARSE24 if all_24 else formats.BITMASK)
    sizes: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    zeros = total = 0

    def compressed(stem: str, value: Tensor) -> list:
        nonlocal zeros, total
        parts = formats.compress(fmt, value)
        sizes[stem] = {"dense_bytes": value.numel() * value.element_size(), "stored_bytes": formats.stored_bytes(parts)}
        zeros += value.numel() - formats.stored_values(fmt, parts)
        total += value.numel()
        return [(f"{stem}.{part}", t.dtype, tuple(t.shape), lambda t=t: t) for part, t in parts.items()]

    renamed = block == formats.LLMPRUNE
    for k, file in enumerate(files):
        written = file
        if renamed:
            stem = formats.WEIGHTS_STEM
            written = directory / (f"{stem}.safetensors" if len(files) == 1 else f"{stem}-{k + 1:05d}-of-{len(files):05d}.safetensors")
        with TensorReader(file) as handle:
            entries = []
            for key in handle.keys():
                stem = key[: -len(".weight")] if key.endswith(".weight") else None
                if key in dropped:
                    continue
                if stem in chosen:
                    entries += compressed(stem, handle.get_tensor(key))
                else:
                    entries.append((key, handle.dtype(key), handle.shape(key), lambda key=key: handle.get_tensor(key)))
            for name, (get, _) in fused.items():
                if home[name] == file:
                    entries += compressed(name, get())
            write_tensors(written, entries, {"format": "pt"})  # written aside, then renamed (over the file read here)
        if written != file:
            file.unlink()
        weight_map.update({name: written.name for name, *_ in entries})
    index = directory / "model.safetensors.index.json"
    if renamed:
        index.unlink(missing_ok=True)
        index = directory / formats.WEIGHTS_INDEX
    if index.is_file() or (renamed and len(files) > 1):
        data = json.loads(index.read_text()) if index.is_file() else {}
        data["weight_map"] = dict(sorted(weight_map.items()))
        data.setdefault("metadata", {})["total_size"] = sum((directory / f).stat().st_size for f in set(weight_map.values()))
        index.write_text(json.dumps(data, indent=2) + "\n")
    _declare_layout(directory, fmt, block, sharded=len(files) > 1, global_sparsity=zeros / max(total, 1),
                    ignore=sorted(linears - chosen))
    return {"format": fmt, "linears": sizes}


def _declare_layout(directory: Path, fmt: str, block: str, *, sharded: bool, global_sparsity: float,
                    ignore: list[str]) -> None:
    """config.json names the layout: llmprune's block (and the guard that stops plain transformers), or
    compressed-tensors 0.14's."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    structure = "2:4" if fmt == formats.SPARSE24 else "unstructured"
    if block == formats.LLMPRUNE:
        weights = formats.WEIGHTS_INDEX if sharded else f"{formats.WEIGHTS_STEM}.safetensors"
        config["quantization_config"] = formats.llmprune_config(fmt, weights=weights, global_sparsity=global_sparsity,
                                                                structure=structure, ignore=ignore)
        config["transformers_weights"] = formats.GUARD
    else:
        config["quantization_config"] = formats.sparsity_config(fmt, global_sparsity=global_sparsity,
                                                                structure=structure, ignore=ignore)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_compressed_directly(model, directory: Path, pruned: set[str], fmt: str, block: str) -> dict:
    """Save a model whose pruned linears are modules (no fused experts) straight in a sparse layout: their weights
    leave the state dict for their compressed parts before save_pretrained writes it, so the dense weights are never
    written and read back (SmolLM2: 1.1 s against 4-8 s, the same tensors). Returns as compress_directory does."""
    state = model.state_dict()
    sizes: dict[str, dict] = {}
    zeros = total = 0
    for name in sorted(pruned):
        W = state.pop(f"{name}.weight").detach()
        parts = formats.compress(fmt, W)
        state.update({f"{name}.{part}": t for part, t in parts.items()})
        sizes[name] = {"dense_bytes": W.numel() * W.element_size(), "stored_bytes": formats.stored_bytes(parts)}
        zeros += W.numel() - formats.stored_values(fmt, parts)
        total += W.numel()
    model.save_pretrained(directory, state_dict=state, max_shard_size=SHARD_SIZE)
    files = sorted(directory.glob("model*.safetensors"))
    headers = {file: read_header(file) for file in files}  # what was written (save_pretrained drops tied copies)
    linears = {k[: -len(".weight")] for h in headers.values() for k, (_, shape) in h.items()
               if k.endswith(".weight") and len(shape) == 2}
    if block == formats.LLMPRUNE:  # file names transformers does not look for by itself
        index = directory / "model.safetensors.index.json"
        weight_map = {}
        for k, file in enumerate(files):
            name = f"{formats.WEIGHTS_STEM}.safetensors" if len(files) == 1 else \
                f"{formats.WEIGHTS_STEM}-{k + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(file, directory / name)
            weight_map.update({key: name for key in headers[file]})
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = dict(sorted(weight_map.items()))
            (directory / formats.WEIGHTS_INDEX).write_text(json.dumps(data, indent=2) + "\n")
            index.unlink()
    _declare_layout(directory, fmt, block, sharded=len(files) > 1, global_sparsity=zeros / max(total, 1),
                    ignore=sorted(linears))
    return {"format": fmt, "linears": sizes}


def _quantized_entries(name: str, W: Tensor, scale: Tensor, zero: Tensor, scheme, dense: bool) -> list[tuple[str, Tensor]]:
    """What a quantized linear P stores: P.weight (ŵ) when dense, else its pack-quantized tensors."""
    from llmprune import quant

    if dense:
        return [(f"{name}.weight", W)]
    return [(f"{name}.{part}", t) for part, t in quant.pack_quantized(W, scale, zero, scheme).items()]


def expert_entries(split: dict[str, Tensor], W: Tensor, scale: Tensor, zero: Tensor,
                   transposed: bool) -> dict[str, Tensor]:
    """A quantized fused experts parameter W as the linears transformers stores it as (`split`: the reverse
    conversion's stored name -> tensor), each with the rows of the experts' scale and zero point buffers ([experts,
    out, groups]) it holds: `P.weight`, `P.weight_scale`, `P.weight_zero_point` per expert projection P, as a
    quantized nn.Linear's state dict holds them, to be packed like one. Transformers' compressed-tensors loader
    expands such per-expert tensors and fuses them when it loads the model."""
    from llmprune import quant

    out = {}
    for key, (e, r) in quant.split_expert_rows(W, split, transposed).items():
        stem, rows = key[: -len(".weight")], slice(r, r + split[key].shape[0])
        out[key] = split[key].contiguous()
        out[f"{stem}.{quant.SCALE}"], out[f"{stem}.{quant.ZERO}"] = scale[e, rows].contiguous(), zero[e, rows].contiguous()
    return out


def _declare_quantized(directory: Path, scheme, quantized: set[str], linears: set[str], zeros: int, total: int,
                       structure: str) -> None:
    from llmprune import quant

    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quant.compressed_tensors_config(
        scheme, ignore=sorted(linears - quantized), global_sparsity=zeros / max(total, 1), structure=structure)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_quantized(model, directory: Path, scheme, *, dense: bool = False, structure: str = "unstructured") -> dict | None:
    """Write a model whose quantized linears hold ŵ and their quant.SCALE / quant.ZERO buffers: in compressed-tensors'
    pack-quantized layout (the scales in the model's dtype; returns what save_compressed_directly returns), or dense
    (ŵ stored, the buffers left out; returns None)."""
    from llmprune import models, quant

    state = model.state_dict()
    sizes, zeros, total = {}, 0, 0
    for param_name in sorted(quant.quantized_expert_params(state)):  # fused experts: stored per expert projection
        W = state.pop(param_name).detach()
        scale, zero = state.pop(f"{param_name}_{quant.SCALE}"), state.pop(f"{param_name}_{quant.ZERO}")
        experts = model.get_submodule(param_name.rpartition(".")[0])
        state.update(expert_entries(models.stored_split(model, param_name, W), W, scale, zero, experts.is_transposed))
    names = sorted(quant.quantized_modules(state))
    for name in names:
        W = state.pop(f"{name}.weight").detach()
        scale, zero = state.pop(f"{name}.{quant.SCALE}"), state.pop(f"{name}.{quant.ZERO}")
        zeros, total = zeros + int((W == 0).sum()), total + W.numel()
        entries = _quantized_entries(name, W, scale, zero, scheme, dense)
        state.update(entries)
        sizes[name] = {"dense_bytes": W.numel() * W.element_size(), "stored_bytes": sum(t.numel() * t.element_size()
                                                                                         for _, t in entries)}
    model.save_pretrained(directory, state_dict=state, max_shard_size=SHARD_SIZE)
    if dense:
        return None
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    _declare_quantized(directory, scheme, set(names), linears, zeros, total, structure)
    return {"format": quant.PACK_FORMAT, "layout": formats.COMPRESSED_TENSORS, "linears": sizes}


def pack_quantized_directory(directory: Path, scheme, *, dense: bool = False, structure: str = "unstructured") -> dict | None:
    """save_quantized for a directory of dense shards that hold ŵ and the quant.SCALE / quant.ZERO tensors beside
    (a streamed run's): each shard rewritten in place, one tensor in memory at a time. Returns as save_quantized."""
    from llmprune import quant

    sizes, zeros, total, linears, names = {}, 0, 0, set(), set()
    weight_map: dict[str, str] = {}
    for file in weight_files(directory):
        with TensorReader(file) as handle:
            keys = list(handle.keys())
            quantized = quant.quantized_modules(keys)
            entries = []
            for key in keys:
                stem, _, suffix = key.rpartition(".")
                if stem in quantized and suffix in (quant.SCALE, quant.ZERO):
                    continue
                if stem in quantized and suffix == "weight":
                    W = handle.get_tensor(key)
                    zeros, total = zeros + int((W == 0).sum()), total + W.numel()
                    parts = _quantized_entries(stem, W, handle.get_tensor(f"{stem}.{quant.SCALE}"),
                                               handle.get_tensor(f"{stem}.{quant.ZERO}"), scheme, dense)
                    sizes[stem] = {"dense_bytes": W.numel() * W.element_size(),
                                   "stored_bytes": sum(t.numel() * t.element_size() for _, t in parts)}
                    entries += [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in parts]
                    continue
                if key.endswith(".weight") and len(handle.shape(key)) == 2:
                    linears.add(stem)
                entries.append((key, handle.dtype(key), handle.shape(key), lambda key=key: handle.get_tensor(key)))
            names |= quantized
            write_tensors(file, entries, {"format": "pt"})  # written aside, then renamed over the file read here
        weight_map.update({key: file.name for key, *_ in entries})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        data.setdefault("metadata", {})["total_size"] = sum((directory / f).stat().st_size for f in set(weight_map.values()))
        index.write_text(json.dumps(data, indent=2) + "\n")
    if dense:
        return None
    _declare_quantized(directory, scheme, names, linears | names, zeros, total, structure)
    return {"format": quant.PACK_FORMAT, "layout": formats.COMPRESSED_TENSORS, "linears": sizes}


def load_compressed(directory: str | Path, fmt: str, *, dtype=None):
    """A plain transformers model from a compressed checkpoint (weights decompressed in memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from llmprune.models import load_errors

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except load_errors() as exc:
        raise LlmpruneError(f"could not read the config.json of {directory} ({_first_line(exc)}); the checkpoint is "
                            "corrupted or of an architecture this transformers does not know.") from None
    for attribute in ("quantization_config", "transformers_weights"):  # the weights are decompressed here
        if hasattr(config, attribute):
            delattr(config, attribute)
    state = read_state_dict(directory, fmt)
    if dtype is None:
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
    # load_state_dict(assign=True) keeps the tensors' own dtype: cast them to the one asked for
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    fused = _has_converted_names(config, state)
    try:
        if fused:  # names transformers converts when loading (experts split per expert): let it convert them
            model_class = AutoModelForCausalLM._model_mapping[type(config)]
            model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
            return model.eval()
        with no_init_weights():  # every weight comes from the checkpoint: skip the random init
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LlmpruneError(f"could not build the model of {directory} from its weights ({_first_line(exc)}).") from None
    # assign=True replaced the input embedding's Parameter, which breaks a tied lm_head: tie it again
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    out_key = next((n + ".weight" for n, m in model.named_modules() if m is output), None)
    if tied and output is not None and inputs is not None:
        output.weight = inputs.weight
        missing = [k for k in missing if k != out_key]
    if missing or unexpected:
        raise LlmpruneError(f"the weights of {directory} do not fit its config (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); the checkpoint is incomplete or corrupted.")
    return model.eval()


def _has_converted_names(config, state: dict[str, Tensor]) -> bool:
    """Whether some stored tensor is no parameter of the model built from `config` (checked on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        names = set(AutoModelForCausalLM.from_config(config).state_dict())
    return bool(set(state) - names)


def load_model(spec: str | None, *, dtype=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer, source) from anything `models.load_model` takes, plus compressed checkpoints
    (local, or on the Hub: those are downloaded and decompressed in memory into a plain transformers model)."""
    from transformers import AutoTokenizer

    from llmprune import models

    source = models.resolve_source(spec)
    local = None
    if source.kind == "dir":
        local = Path(source.path)
    elif source.kind == "hub":
        local = _hub_snapshot_if_compressed(source.path, source.revision)
    fmt = read_format(local) if local is not None else None
    if fmt is None:
        return models.load_model(spec, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    torch_dtype = models.parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)
    except models.load_errors() as exc:
        raise LlmpruneError(f"could not load the tokenizer of {local} ({_first_line(exc)}); its tokenizer or config files "
                            "are damaged: download or save the checkpoint again.") from None
    return load_compressed(local, fmt, dtype=torch_dtype), tokenizer, source


def _hub_snapshot_if_compressed(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of a Hub model stored in a sparse layout; None for any other model (transformers loads
    those itself, and reports network problems better)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        config = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception:  # offline, gated or missing
        return None
    if read_format(config.parent) is None:
        return None
    return Path(snapshot_download(repo_id, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
