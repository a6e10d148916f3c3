"""Pruning that survives crashes and models larger than memory.

`PartialRun` keeps a run's state in OUT.partial/ (each finished block's weights, the next block's inputs,
a progress record) so `--resume` continues after the last finished block. `ShardSource` builds the model
on the meta device and reads each decoder block's weights from the safetensors shards only while that
block is processed; the pruned blocks are then assembled into OUT/ without the model ever being whole in
memory. Both plug into the loop as a `calibrate.BlockStore`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import checkpoint, formats
from llmprune.calibrate import BlockStore, LinearResult
from llmprune.distributed import SINGLE, Dist
from llmprune.errors import LlmpruneError
from llmprune.models import find_blocks

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
STATE_VERSION = 1
CHECKPOINT_SECONDS = 60.0  # default least time between two saves of a partial run's state (--checkpoint-every)


def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    return out.with_name(out.name + ".partial")


# ---- reading a model block by block ---------------------------------------------------------------


class ShardSource:
    """The safetensors shards of a model directory, read tensor by tensor into a model built on the meta device."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        self.file_of: dict[str, Path] = {}
        files = checkpoint.weight_files(self.directory)
        if not files:
            raise LlmpruneError(f"{self.directory} holds no .safetensors weights; streaming reads safetensors shards.")
        for file in files:
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
        checkpoint.return_freed_memory()

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
        return checkpoint.DTYPE_OF_NAME[view.get_dtype()], tuple(view.get_shape())

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


def _flat(options: dict, prefix: str = "") -> dict:
    """{"recipe": {"sparsity": 0.5}} -> {"recipe.sparsity": 0.5}, so a mismatch names the field."""
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


# ---- the state of a run in OUT.partial/ --------------------------------------------------------------


class PartialRun(BlockStore):
    """OUT.partial/: `blocks/block-NNNNN.safetensors` (each finished block's parameters by full name),
    `inputs-rankR.safetensors` (that rank's micro-batches of the next block's inputs) and `progress.json`
    (options, blocks saved, per-linear results), each replaced atomically, progress last.

    The state is saved after a block once `every` seconds have passed since the last save: a crash (or Ctrl-C while
    saving the output) loses at most that much work, and a model whose blocks take a second each does not write
    its activations to disk thirty times (on SmolLM2 that was 2.7 GB of writes and 7% of a Wanda run, measured),
    nor its whole pruned weights once more at the end. Streamed blocks are written as they finish all the same,
    since their file is their only copy, and their record is saved after the last block.
    """

    def __init__(self, path: Path, model: nn.Module, *, options: dict, dist: Dist = SINGLE,
                 source: ShardSource | None = None, every: float = CHECKPOINT_SECONDS):
        self.path, self.model, self.options, self.dist, self.source = path, model, options, dist, source
        self.blocks_name, self._blocks = find_blocks(model)
        self.total = len(self._blocks)
        self.every = every
        self.done_blocks = 0  # pruned, in memory or streamed
        self.saved_blocks = 0  # in progress.json: where a resume starts
        self._last_save = time.monotonic()
        self.results: list[dict] = []
        self.extra: dict = {}  # run-level facts to keep (allocation, notes)

    # -- starting --
    def start(self, extra: dict) -> None:
        if self.dist.main:
            (self.path / "blocks").mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.dist.barrier()
        if self.dist.main:
            self._write_progress()
        self._last_save = time.monotonic()

    @classmethod
    def read_progress(cls, path: Path) -> dict:
        try:
            progress = json.loads((path / PROGRESS_FILE).read_text())
            if progress.get("state_version") != STATE_VERSION:
                raise ValueError(f"state version {progress.get('state_version')}, this llmprune writes {STATE_VERSION}")
            int(progress["done"]), progress["options"], progress["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LlmpruneError(f"{path} is corrupted ({PROGRESS_FILE}: {exc}); delete it to start over: rm -r '{path}'") from None
        return progress

    def resume(self, progress: dict, needs_inputs: bool = True) -> Sequence[Tensor] | None:
        """Take up a partial run: check its options, put the finished blocks' weights in place (in memory) and
        return this rank's saved inputs of the next block (None when every block is done or none are needed)."""
        ours, theirs = _flat(self.options), _flat(progress["options"])
        differ = [f"{k} {ours.get(k)!r} (the partial run had {theirs.get(k)!r})"
                  for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if differ:
            raise LlmpruneError(f"--resume with different options than the partial run in {self.path}: {'; '.join(differ)}; "
                                f"rerun with the same options, or delete it to start over: rm -r '{self.path}'")
        self.done_blocks, self.results = int(progress["done"]), list(progress["results"])
        self.saved_blocks = self.done_blocks
        self.extra = progress.get("extra", {})
        if self.source is None:
            for i in range(self.done_blocks):
                self._load_block(i, self._blocks[i])
        if self.done_blocks >= self.total or not needs_inputs:
            return None
        return self._read_inputs()

    def _corrupt(self, what: str) -> LlmpruneError:
        return LlmpruneError(f"{self.path} is corrupted ({what}); delete it to start over: rm -r '{self.path}'")

    def _block_file(self, index: int) -> Path:
        return self.path / "blocks" / f"block-{index:05d}.safetensors"

    def _load_block(self, index: int, block: nn.Module) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        prefix = f"{self.blocks_name}.{index}."
        try:
            state = load_file(str(self._block_file(index)))
            block.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise self._corrupt(f"block {index}: {str(exc).splitlines()[0]}") from None

    def _read_inputs(self) -> "_SavedInputs":
        from safetensors import SafetensorError, safe_open

        file = self.path / f"inputs-rank{self.dist.rank}.safetensors"
        try:
            with safe_open(str(file), framework="pt") as handle:
                block = int((handle.metadata() or {}).get("block", -1))
                count = len(handle.keys())
                for k in range(count):  # every tensor is there and readable (read one at a time later)
                    handle.get_slice(str(k)).get_shape()
        except (SafetensorError, OSError, ValueError) as exc:
            raise self._corrupt(f"{file.name}: {str(exc).splitlines()[0]}") from None
        if block != self.done_blocks:
            raise self._corrupt(f"{file.name} holds the inputs of block {block}, progress says {self.done_blocks}")
        return _SavedInputs(file, count)

    # -- BlockStore --
    def outside(self):
        if self.source is None:
            return contextlib.nullcontext()
        return self._outside()

    @contextlib.contextmanager
    def _outside(self):
        """The weights the model runs before block 0 (embeddings, ...): every parameter outside the blocks but
        the output embedding's own, read for the capture and released after it."""
        output = self.model.get_output_embeddings()
        output_name = next((n for n, m in self.model.named_modules() if m is output), None) if output is not None else None
        names = [n for n, _ in self.model.named_parameters()
                 if not n.startswith(self.blocks_name + ".") and (output_name is None or not n.startswith(output_name + "."))]
        self.source.materialize(self.model, "", names)
        try:
            yield
        finally:
            self.source.release(self.model, names)

    def load(self, index: int, block: nn.Module) -> None:
        if self.source is not None:
            self.source.materialize(block, f"{self.blocks_name}.{index}")

    def release(self, index: int, block: nn.Module) -> None:
        if self.source is not None:
            self.source.release(block)

    def done(self, index: int, block: nn.Module, results: list[LinearResult], inputs: list[Tensor] | None) -> None:
        from dataclasses import asdict

        if self.dist.main and self.source is not None:
            self._write_block(index, block)
        self.done_blocks = index + 1
        self.results.extend(asdict(r) for r in results)
        # after the last block too, only once the interval has passed: a run shorter than it is cheaper to redo than
        # to write out (a streamed run's blocks are on disk already, so its record is brought up to date)
        last = self.done_blocks == self.total
        save = time.monotonic() - self._last_save >= self.every or (last and self.source is not None)
        if self.dist.active:  # every rank must take the same decision: rank 0's clock decides
            save = self.dist.broadcast_object(save, 0)
        if save:
            self._save(inputs)
        self.release(index, block)

    def _save(self, inputs: Sequence[Tensor] | None) -> None:
        """Make the state on disk the state in memory: the blocks done since the last save, the next block's inputs,
        then progress.json."""
        if self.dist.main and self.source is None:
            for i in range(self.saved_blocks, self.done_blocks):
                self._write_block(i, self._blocks[i])
        if inputs is not None:
            _write_inputs(inputs, self.path / f"inputs-rank{self.dist.rank}.safetensors", {"block": str(self.done_blocks)})
        self.dist.barrier()
        self.saved_blocks = self.done_blocks
        if self.dist.main:
            self._write_progress()
        self._last_save = time.monotonic()

    def _write_block(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.blocks_name}.{index}."
        _write_dict(self._block_file(index), {prefix + k: v for k, v in block.state_dict().items()})

    def _write_progress(self) -> None:
        record = {"state_version": STATE_VERSION, "blocks": self.total, "done": self.saved_blocks, "options": self.options,
                  "results": self.results, "extra": self.extra}
        tmp = self.path / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.path / PROGRESS_FILE)

    def remove(self) -> None:
        if self.dist.main:
            shutil.rmtree(self.path, ignore_errors=True)

    # -- the final directory, from the finished blocks (streaming) --
    def assemble(self, target: Path, *, tokenizer, fmt: str, targets: set[str], report: dict, files: dict[str, str],
                 overwrite: bool = False) -> Path:
        """Write OUT/ from the finished blocks and the source's other tensors: one dense shard per block plus one
        for the rest, an index and config.json, then finished as any checkpoint (compression, tokenizer, files).
        Tensors are read and written one at a time."""
        from safetensors import safe_open

        source = self.source
        shards = self.total + 1
        weight_map: dict[str, str] = {}
        with checkpoint.atomic_directory(target, overwrite=overwrite) as tmp:
            for i in range(self.total):
                shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                with safe_open(str(self._block_file(i)), framework="pt") as handle:
                    names = list(handle.keys())
                    entries = [(source.key_of.get(name, name), *source.header(handle, name),
                                lambda name=name: handle.get_tensor(name)) for name in names if name not in source.converted]
                    # fused parameters go back to the stored per-expert tensors (one block's worth in memory)
                    split = source.unfuse({name: handle.get_tensor(name) for name in names if name in source.converted})
                    entries += [(key, t.dtype, tuple(t.shape), lambda t=t: t.contiguous()) for key, t in split.items()]
                    checkpoint.write_tensors(tmp / shard, entries, {"format": "pt"})
                    del split
                weight_map.update({key: shard for key, *_ in entries})
            shard = f"model-{shards:05d}-of-{shards:05d}.safetensors"
            rest = source.outside_keys(self.model)
            checkpoint.write_tensors(tmp / shard, [(key, *source.outside_header(key), lambda key=key: source.read_outside(key))
                                                   for key in rest], {"format": "pt"})
            weight_map.update({key: shard for key in rest})
            index = {"metadata": {"total_size": sum((tmp / f).stat().st_size for f in set(weight_map.values()))},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            config = json.loads((source.directory / "config.json").read_text())
            config["dtype"] = str(source.dtype).replace("torch.", "")
            config.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            generation = source.directory / "generation_config.json"
            if generation.is_file():
                shutil.copyfile(generation, tmp / generation.name)
            stored = {source.key_of[f"{name}.weight"][: -len(".weight")] for name in targets
                      if f"{name}.weight" in source.key_of}  # names as in the shards
            experts = {name for name in targets if f"{name}.weight" not in source.key_of}
            also = fused = None
            if experts and fmt != "dense" and checkpoint.CONFIG_BLOCK[fmt] == formats.LLMPRUNE:  # stored whole
                fused = checkpoint.fused_experts(experts, self._read_fused, source.stored_keys)
            elif experts:  # stored per expert
                also = checkpoint.split_experts(self.model)
            checkpoint.finish_directory(tmp, tokenizer=tokenizer, report=report, fmt=fmt, targets=stored, also=also,
                                        fused=fused, files=files)
        return target


    def _read_fused(self, name: str) -> Tensor:
        """A fused parameter of a finished block, from its block file."""
        index = int(name[len(self.blocks_name) + 1:].split(".", 1)[0])
        with checkpoint.TensorReader(self._block_file(index)) as handle:
            return handle.get_tensor(name)


class _SavedInputs(Sequence):
    """Micro-batch inputs saved by a partial run, read one at a time."""

    def __init__(self, file: Path, count: int):
        self.file, self.count = file, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as handle:
            return handle.get_tensor(str(k))


def _write_inputs(inputs: Sequence[Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The micro-batches' inputs as tensors "0", "1", ..., read one at a time (they may be offloaded)."""
    shapes = getattr(inputs, "shapes", None) or [(x.dtype, tuple(x.shape)) for x in inputs]
    checkpoint.write_tensors(path, [(str(k), dtype, shape, lambda k=k: inputs[k]) for k, (dtype, shape) in enumerate(shapes)], metadata)


def _write_dict(path: Path, tensors: dict[str, Tensor]) -> None:
    checkpoint.write_tensors(path, [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()], {"format": "pt"})
