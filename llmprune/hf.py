"""transformers' own `from_pretrained` on llmprune checkpoints, through its extension points: a quantization config
and an HfQuantizer registered under quant_method "llmprune" (`register_quantization_config`, `register_quantizer`).

`import llmprune` registers them (at once if transformers is imported already, else when it is). Then, for a
checkpoint in llmprune's layout (formats.py):

1. the quantizer points transformers at the weights file named in quantization_config (config.json's
   `transformers_weights` holds formats.GUARD, which stops plain transformers with an error naming llmprune);
2. before the weights are read, every compressed weight P (its parts P.shape, P.compressed, P.bitmask and
   P.row_offsets, found in the safetensors headers) gets a holder in the model: the linear module P, or the
   parameter P of a fused experts module, is swapped for a module whose buffers carry the parts' names, shapes
   and dtypes (the values in the model's dtype), so transformers reads them like any tensor, cast and placed by
   `dtype` and `device_map`;
3. after, each holder is decompressed where it was placed into the original module's weight (or parameter), or,
   with `sparse_kernels: true` in the quantization config, into a SparseLinear (deploy.py). Dense weights leave
   no trace of the quantizer: the model saves as an ordinary dense model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmprune import formats

log = logging.getLogger(__name__)


class LlmpruneConfig(QuantizationConfigMixin):
    """config.json → quantization_config of an llmprune checkpoint (formats.llmprune_config writes it).

    sparse_kernels: build the compressed linears as SparseLinear layers (llmprune's kernels) instead of dense
    weights. Set it in the config a checkpoint is loaded with:

    >>> config = AutoConfig.from_pretrained("m24"); config.quantization_config["sparse_kernels"] = True  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("m24", config=config)                            # doctest: +SKIP
    """

    def __init__(self, format: str = formats.BITMASK, weights: str | None = None, sparse_kernels: bool = False,
                 layout_version: int = formats.LAYOUT_VERSION, **fields):
        self.quant_method = formats.LLMPRUNE
        self.format = format
        self.weights = weights
        self.sparse_kernels = bool(sparse_kernels)
        self.layout_version = layout_version
        for key, value in fields.items():
            setattr(self, key, value)
        # transformers drops the quantizer and this config after loading when `dequantize` holds: dense weights
        # make an ordinary model, which saves as one
        self.dequantize = not self.sparse_kernels

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "dequantize"}


class _Holder(nn.Module):
    """Stands for a compressed weight while transformers loads: buffers named as its stored parts."""

    def __init__(self, parts: dict[str, tuple[torch.dtype, tuple]], values_dtype: torch.dtype):
        super().__init__()
        for name, (dtype, shape) in parts.items():
            dtype = values_dtype if name == "compressed" else dtype
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))


class LlmpruneQuantizer(HfQuantizer):
    """Loads llmprune's compressed checkpoints (it does not prune or quantize a dense model)."""

    requires_calibration = True  # refuses `quantization_config=LlmpruneConfig()` on a dense checkpoint

    def __init__(self, quantization_config: LlmpruneConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._held: list[tuple] = []

    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        if int(config.layout_version) > formats.LAYOUT_VERSION:
            raise ValueError(f"this checkpoint has llmprune layout version {config.layout_version}, newer than this "
                             f"llmprune's {formats.LAYOUT_VERSION}; upgrade llmprune: pip install -U llmprune")
        if config.format not in (formats.BITMASK, formats.SPARSE24):
            raise ValueError(f"llmprune quantization_config names the format '{config.format}'; this llmprune reads "
                             f"{formats.BITMASK} and {formats.SPARSE24} (upgrade llmprune if the checkpoint is newer)")
        if not config.weights or not str(config.weights).endswith((".safetensors", ".safetensors.index.json")):
            raise ValueError("llmprune quantization_config names no weights file (`weights`); the config.json is damaged")

    def _point_at_weights(self, config):
        """Replace config.json's guard by the weights file. transformers calls one of these hooks with the model
        config after choosing the quantizer and before it looks for weight files (5.0-5.18: update_tp_plan and
        update_ep_plan; 5.19 on: update_attn_implementation)."""
        if getattr(config, "transformers_weights", None) in (None, formats.GUARD):
            config.transformers_weights = self.quantization_config.weights
        return config

    update_tp_plan = update_ep_plan = update_attn_implementation = _point_at_weights

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("llmprune checkpoints load from their safetensors files; none were found")
        modules = dict(model.named_modules())
        for name, parts in sorted(stored_parts(checkpoint_files).items()):
            module = modules.get(name)
            owner_name, _, leaf = name.rpartition(".")
            owner = modules.get(owner_name)
            if module is not None and isinstance(getattr(module, "weight", None), nn.Parameter):
                holder = _Holder(parts, module.weight.dtype)
                for param_name, param in list(module._parameters.items()):
                    if param_name != "weight" and param is not None:
                        holder.register_parameter(param_name, param)  # the bias loads as P.bias, into the holder
                _set_child(model, name, holder)
                self._held.append((name, module, holder, None))
            elif owner is not None and isinstance(owner._parameters.get(leaf), nn.Parameter):
                param = owner._parameters.pop(leaf)
                holder = _Holder(parts, param.dtype)
                owner.add_module(leaf, holder)
                self._held.append((name, owner, holder, param))
            else:
                raise ValueError(f"the compressed weight '{name}' of this checkpoint is no module or parameter of "
                                 f"{type(model).__name__} built from its config.json; the checkpoint is damaged")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        fmt = self.quantization_config.format
        sparse = self.quantization_config.sparse_kernels
        for name, module, holder, param in self._held:
            stored = dict(holder.named_buffers(recurse=False))
            if any(t.device.type == "meta" for t in stored.values()):
                raise ValueError(f"'{name}' was offloaded by device_map; llmprune checkpoints load onto CPUs and GPUs "
                                 "only: pass a device_map without 'disk' or CPU offload, or convert the checkpoint to dense")
            W = formats.decompress(fmt, stored, name)
            if param is not None:  # a fused parameter (MoE experts)
                if W.shape != param.shape:
                    raise ValueError(f"'{name}' decompresses to {tuple(W.shape)}, the model wants {tuple(param.shape)}")
                delattr(module, name.rpartition(".")[2])
                module.register_parameter(name.rpartition(".")[2], nn.Parameter(W, requires_grad=param.requires_grad))
                continue
            if W.shape != module.weight.shape:
                raise ValueError(f"'{name}' decompresses to {tuple(W.shape)}, the model wants {tuple(module.weight.shape)}")
            module.weight = nn.Parameter(W, requires_grad=module.weight.requires_grad)
            for param_name, value in holder.named_parameters(recurse=False):
                setattr(module, param_name, value)
            if sparse:
                from llmprune.deploy import SparseLinear

                module = SparseLinear.from_linear(module, fmt)
            _set_child(model, name, module)
        self._held = []
        if sparse:  # the linears left dense (the head) through our dense kernel where it is faster (AMD CPUs)
            from llmprune.deploy import speed_up_dense

            speed_up_dense(model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False  # only with sparse_kernels; dense weights drop the quantizer (see LlmpruneConfig.dequantize)

    @property
    def is_trainable(self) -> bool:
        return not self.quantization_config.sparse_kernels


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def stored_parts(files) -> dict[str, dict[str, tuple[torch.dtype, tuple]]]:
    """{P: {part: (dtype, shape)}} for every compressed weight in the safetensors files, from their headers."""
    from llmprune.files import read_header

    found: dict[str, dict[str, tuple[torch.dtype, tuple]]] = {}
    for file in files:
        for key, (dtype, shape) in read_header(Path(file)).items():
            prefix, _, part = key.rpartition(".")
            if part in formats.PART_NAMES:
                found.setdefault(prefix, {})[part] = (dtype, shape)
    return found


_registered = False


def register() -> bool:
    """Register the llmprune quantization config and quantizer with transformers (once); False where this
    transformers has no such registry or something else holds the name."""
    global _registered
    if _registered:
        return True
    from transformers.quantizers import auto

    if formats.LLMPRUNE in auto.AUTO_QUANTIZER_MAPPING:
        _registered = auto.AUTO_QUANTIZER_MAPPING[formats.LLMPRUNE].__name__ == LlmpruneQuantizer.__name__
        return _registered
    auto.register_quantization_config(formats.LLMPRUNE)(LlmpruneConfig)
    auto.register_quantizer(formats.LLMPRUNE)(LlmpruneQuantizer)
    _registered = True
    return True


register()  # importing this module registers it (llmprune/__init__.py imports it once transformers is imported)
