"""Models larger than memory: `ShardSource` builds the model on the meta device and reads each decoder block's
weights from the safetensors shards only while that block is processed (a `calibrate.BlockStore` brings them in
and drops them, see partial.py). Tensors transformers renames or fuses when loading (per-expert MoE weights) are
mapped and fused by transformers' own conversion rules."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import files
from llmprune.errors import LlmpruneError
from llmprune.models import find_blocks


class ShardSource:
    """The safetensors shards of a model directory, read tensor by tensor into a model built on the meta device."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        self.file_of: dict[str, Path] = {}
        shard_files = files.weight_files(self.directory)
        if not shard_files:
            raise LlmpruneError(f"{self.directory} holds no .safetensors weights; streaming reads safetensors shards.")
        for file in shard_files:
            if not file.is_file():
                raise LlmpruneError(f"{self.directory}: shard {file.name} named by model.safetensors.index.json is missing; "
                                    "download the model again.")
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        self.file_of[key] = file
            except (SafetensorError, OSError) as exc:
                raise LlmpruneError(f"could not read {file.name} ({exc}); the file is truncated or corrupted.") from None
        self.key_of: dict[str, str] = {}  # parameter name in the model -> tensor name in the shards
        # parameter name -> (transformers' converter, [(its source pattern, tensor name in the shards)]): parameters
        # that transformers assembles from several stored tensors when loading (fused MoE experts)
        self.converted: dict[str, tuple[object, list[tuple[str, str]]]] = {}
        files.return_freed_memory()

    def build(self, dtype: torch.dtype | None, trust_remote_code: bool = False) -> nn.Module:
        """The model with every parameter on the meta device (buffers real), mapped to the shards' tensors."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from llmprune.models import load_errors

        try:
            config = AutoConfig.from_pretrained(str(self.directory), trust_remote_code=trust_remote_code)
        except load_errors() as exc:
            raise LlmpruneError(f"could not read the config.json of {self.directory} ({str(exc).strip().splitlines()[0]}); "
                                "the checkpoint is damaged or of an architecture this transformers does not know.") from None
        if dtype is None:
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.tie_weights()  # tied on the meta device too, so lm_head maps to the stored embeddings
        self.dtype = dtype
        self.model = model
        self._map(model)
        return model.eval()

    def _map(self, model: nn.Module) -> None:
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        seen: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            for key in (name, name[len(prefix):] if name.startswith(prefix) else None):
                if key is not None and key in self.file_of:
                    self.key_of[name] = key
                    seen[id(param)] = key
                    break
        for name, param in model.named_parameters(remove_duplicate=False):
            if name not in self.key_of and id(param) in seen:  # tied to a stored tensor (lm_head = embeddings)
                self.key_of[name] = seen[id(param)]
        missing = [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in self.key_of]
        if missing:
            self._map_converted(model, set(missing))
        for name in missing:
            if name not in self.key_of and name not in self.converted:
                raise LlmpruneError(
                    f"{self.directory}: tensor '{name}' is missing from the safetensors shards (nor does transformers' "
                    "conversion of stored names give it); download the model again, or prune without --stream.")

    def _map_converted(self, model: nn.Module, missing: set[str]) -> None:
        """Map the parameters transformers builds from differently named or several stored tensors (renamed keys,
        per-expert weights fused into one 3-D parameter), by transformers' own conversion rules for the model."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
        except ImportError:  # a transformers without conversion rules stores every parameter under its own name
            return
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        params = dict(model.named_parameters(remove_duplicate=False))
        used = set(self.key_of.values())
        for key in sorted(self.file_of, key=dot_natural_key):  # transformers' order, which fixes the expert order
            if key in used:
                continue
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
            if name not in missing:
                continue
            if pattern is None:
                self.key_of[name] = key
            else:
                self.converted.setdefault(name, (by_pattern[pattern], []))[1].append((pattern, key))

    def stored_keys(self, name: str) -> list[str]:
        """The shards' tensors a parameter is read from."""
        if name in self.converted:
            return [key for _, key in self.converted[name][1]]
        return [self.key_of[name]]

    @contextlib.contextmanager
    def _reader(self):
        """Read tensors by name; the shards are open (memory-mapped) only inside this context, so the pages read
        do not stay resident once a block is done."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}

            def read(key: str) -> Tensor:
                file = self.file_of[key]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                return handles[file].get_tensor(key)
            yield read

    def materialize(self, module: nn.Module, prefix: str, names: list[str] | None = None) -> None:
        """Read the parameters of `module` (named `prefix` in the model; all, or those `names` relative to it) from
        the shards, in the run's dtype."""
        with self._reader() as read:
            for name, owner, leaf, param in _parameters(module, names):
                self._set(read, owner, leaf, param, f"{prefix}.{name}" if prefix else name)

    def _set(self, read, owner: nn.Module, leaf: str, param: Tensor, full: str) -> None:
        def cast(tensor: Tensor) -> Tensor:
            return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

        if full in self.converted:
            tensor = self._convert(full, lambda key: cast(read(key)))
        else:
            tensor = cast(read(self.key_of[full]))
        if tuple(tensor.shape) != tuple(param.shape):
            raise LlmpruneError(f"{self.directory}: tensor '{', '.join(self.stored_keys(full))}' gives shape "
                                f"{tuple(tensor.shape)}, the model's config wants {tuple(param.shape)}; the checkpoint "
                                "does not fit its config.")
        owner._parameters[leaf] = nn.Parameter(tensor.contiguous(), requires_grad=False)

    def _convert(self, full: str, read) -> Tensor:
        """A converted parameter from its stored tensors, by transformers' converter (e.g. experts stacked)."""
        import copy

        template, sources = self.converted[full]
        converter = copy.deepcopy(template)
        for pattern, key in sources:
            converter.add_tensor(full, key, pattern, lambda key=key: read(key))
        produced = converter.convert(full, model=self.model, config=self.model.config)
        tensor = produced.get(full)
        if tensor is None:
            raise LlmpruneError(f"{self.directory}: converting {', '.join(k for _, k in sources)} did not give '{full}' "
                                f"(it gave {', '.join(produced)}); prune without --stream.")
        return tensor[0] if isinstance(tensor, list) else tensor

    def unfuse(self, fused: dict[str, Tensor]) -> dict[str, Tensor]:
        """Converted parameters by model name -> the tensors the shards store them as (split back by transformers'
        reverse conversion, the way save_pretrained writes them)."""
        if not fused:
            return {}
        from transformers.core_model_loading import revert_weight_conversion

        split = revert_weight_conversion(self.model, fused)
        expected = {key for name in fused for key in self.stored_keys(name)}
        if set(split) != expected:
            raise LlmpruneError(f"{self.directory}: transformers' reverse conversion gives {sorted(set(split) - expected)[:3]} "
                                f"instead of the stored {sorted(expected - set(split))[:3]}; prune without --stream.")
        return split

    @staticmethod
    def release(module: nn.Module, names: list[str] | None = None) -> None:
        """Put `module`'s parameters (all, or those `names`) back on the meta device, freeing their memory."""
        for _, owner, leaf, param in _parameters(module, names):
            owner._parameters[leaf] = _meta(param)

    def outside_keys(self, model: nn.Module) -> list[str]:
        """Tensors of the shards that are not inside the decoder blocks, in shard order."""
        blocks_name, _ = find_blocks(model)
        inside = {key for name in [*self.key_of, *self.converted] if name.startswith(blocks_name + ".")
                  for key in self.stored_keys(name)}
        return [key for key in self.file_of if key not in inside]

    @staticmethod
    def header(handle, key: str) -> tuple[torch.dtype, tuple]:
        """(dtype, shape) of a tensor in an open safetensors file, without reading it."""
        view = handle.get_slice(key)
        return files.DTYPE_OF_NAME[view.get_dtype()], tuple(view.get_shape())

    def outside_header(self, key: str) -> tuple[torch.dtype, tuple]:
        """(dtype, shape) `read_outside` gives the tensor: the run's dtype for floating tensors, else the stored one."""
        from safetensors import safe_open

        with safe_open(str(self.file_of[key]), framework="pt") as handle:
            dtype, shape = self.header(handle, key)
        return (self.dtype if dtype.is_floating_point else dtype), shape

    def read_outside(self, key: str) -> Tensor:
        with self._reader() as read:
            tensor = read(key)
        return (tensor.to(self.dtype) if tensor.is_floating_point() else tensor).contiguous()


def _meta(param: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)


def _parameters(module: nn.Module, names: list[str] | None = None):
    """(name, owning module, attribute, parameter) for every parameter of `module`, or for those `names`."""
    if names is not None:
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            yield name, owner, leaf, owner._parameters[leaf]
        return
    for owner_name, owner in module.named_modules():
        for leaf, param in list(owner._parameters.items()):
            if param is not None:
                yield (f"{owner_name}.{leaf}" if owner_name else leaf), owner, leaf, param


