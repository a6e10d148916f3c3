"""Pruning that survives crashes: `PartialRun` keeps a run's state in OUT.partial/ (each finished block's weights,
the next block's inputs, a progress record) so `--resume` continues after the last finished block, and, for a
streamed model (shards.py), assembles OUT/ from the finished blocks without the model ever being whole in memory.
It plugs into the loop as a `calibrate.BlockStore`."""
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
from llmprune.files import TensorReader, write_tensors
from llmprune.calibrate import BlockStore, LinearResult
from llmprune.distributed import SINGLE, Dist
from llmprune.errors import LlmpruneError
from llmprune.models import find_blocks
from llmprune.plan import CHECKPOINT_SECONDS
from llmprune.quant import SCALE, ZERO, quantized_expert_params, quantized_modules
from llmprune.shards import ShardSource

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
STATE_VERSION = 1


def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    return out.with_name(out.name + ".partial")


def _flat(options: dict, prefix: str = "") -> dict:
    """{"recipe": {"sparsity": 0.5}} -> {"recipe.sparsity": 0.5}, so a mismatch names the field."""
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
            state = {k[len(prefix):]: v for k, v in load_file(str(self._block_file(index))).items()}
            for name in quantized_modules(state):  # a quantized linear's scales: buffers the fresh block lacks
                module = block.get_submodule(name)
                for key in (SCALE, ZERO):
                    module.register_buffer(key, torch.empty_like(state[f"{name}.{key}"]), persistent=True)
            for name in quantized_expert_params(state):  # and a quantized experts module's
                experts, _, param = name.rpartition(".")
                for key in (SCALE, ZERO):
                    block.get_submodule(experts).register_buffer(f"{param}_{key}", torch.empty_like(state[f"{name}_{key}"]),
                                                                 persistent=True)
            block.load_state_dict(state, strict=True)
        except (SafetensorError, OSError, RuntimeError, AttributeError, KeyError) as exc:
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
    def assemble(self, out: Path, *, tokenizer, fmt: str, pruned: set[str], report: dict, files: dict[str, str],
                 overwrite: bool = False, scheme=None) -> Path:
        """Write OUT/ from the finished blocks and the source's other tensors: one dense shard per block plus one
        for the rest, an index and config.json, then finished as any checkpoint (compression, tokenizer, files).
        Tensors are read and written one at a time."""
        from safetensors import safe_open

        source = self.source
        shards = self.total + 1
        weight_map: dict[str, str] = {}
        with checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
            for i in range(self.total):
                shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                with safe_open(str(self._block_file(i)), framework="pt") as handle:
                    names = list(handle.keys())
                    experts = quantized_expert_params(names)  # quantized fused experts: stored per expert projection
                    buffers = {f"{name}_{part}" for name in experts for part in (SCALE, ZERO)}
                    entries = [(source.key_of.get(name, name), *source.header(handle, name),
                                lambda name=name: handle.get_tensor(name)) for name in names
                               if name not in source.converted and name not in buffers]
                    # fused parameters go back to the stored per-expert tensors (one block's worth in memory)
                    split = source.unfuse({name: handle.get_tensor(name) for name in names
                                           if name in source.converted and name not in experts})
                    for name in sorted(experts):
                        W = handle.get_tensor(name)
                        split.update(checkpoint.expert_entries(
                            source.unfuse({name: W}), W, handle.get_tensor(f"{name}_{SCALE}"),
                            handle.get_tensor(f"{name}_{ZERO}"), self.model.get_submodule(name.rpartition(".")[0]).is_transposed))
                    entries += [(key, t.dtype, tuple(t.shape), lambda t=t: t.contiguous()) for key, t in split.items()]
                    write_tensors(tmp / shard, entries, {"format": "pt"})
                    del split
                weight_map.update({key: shard for key, *_ in entries})
            shard = f"model-{shards:05d}-of-{shards:05d}.safetensors"
            rest = source.outside_keys(self.model)
            write_tensors(tmp / shard, [(key, *source.outside_header(key), lambda key=key: source.read_outside(key))
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
            if scheme is not None:  # quantized: pack-quantized (or dense ŵ), every linear as stored
                written = checkpoint.pack_quantized_directory(
                    tmp, scheme, dense=fmt == "dense", structure=(report.get("recipe") or {}).get("pattern", "unstructured"))
                checkpoint.finish_directory(tmp, tokenizer=tokenizer, report=report, fmt="dense", pruned=set(),
                                            files=files, written=written)
                return out
            stored = {source.key_of[f"{name}.weight"][: -len(".weight")] for name in pruned
                      if f"{name}.weight" in source.key_of}  # names as in the shards
            experts = {name for name in pruned if f"{name}.weight" not in source.key_of}
            also = fused = None
            if experts and fmt != "dense" and checkpoint.CONFIG_BLOCK[fmt] == formats.LLMPRUNE:  # stored whole
                fused = checkpoint.fused_experts(experts, self._read_fused, source.stored_keys)
            elif experts:  # stored per expert
                also = checkpoint.split_experts(self.model)
            checkpoint.finish_directory(tmp, tokenizer=tokenizer, report=report, fmt=fmt, pruned=stored, also=also,
                                        fused=fused, files=files)
        return out


    def _read_fused(self, name: str) -> Tensor:
        """A fused parameter of a finished block, from its block file."""
        index = int(name[len(self.blocks_name) + 1:].split(".", 1)[0])
        with TensorReader(self._block_file(index)) as handle:
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
    write_tensors(path, [(str(k), dtype, shape, lambda k=k: inputs[k]) for k, (dtype, shape) in enumerate(shapes)], metadata)


def _write_dict(path: Path, tensors: dict[str, Tensor]) -> None:
    write_tensors(path, [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()], {"format": "pt"})
