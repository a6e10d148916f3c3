"""The calibration activations: every micro-batch's hidden states, in memory on the compute device or one file each
on disk, and, for every block, the other arguments the model passes it (masks, position embeddings, ...).

The loop only asks the cache for a micro-batch's hidden states and gives it their replacement; where they live
is the cache's business (and the plan's decision)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn


class _Stop(Exception):
    pass


class ActivationCache:
    """Micro-batch k's hidden states [microbatch, seqlen, hidden] (`hidden(k)`, replaced by `update(k, x)`) and its
    block arguments (`args(k, block)`). With a directory, each micro-batch is a file of its own, written at once,
    so memory holds one at a time."""

    def __init__(self, device: torch.device, directory: Path | None = None, tag: str = ""):
        self.device, self.directory, self.tag = device, directory, tag
        self._hidden: list[Tensor | None] = []
        self._args: list[list[tuple[tuple, dict]]] = []
        self.shapes: list[tuple[torch.dtype, tuple]] = []  # (dtype, shape) of each micro-batch's hidden states
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def capture(cls, model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor], device: torch.device,
                directory: Path | None = None, tag: str = "") -> "ActivationCache":
        """Run each micro-batch of token ids up to the first block, recording what every block is passed."""
        cache = cls(device, directory, tag)
        for chunk in chunks:
            hidden, records = _capture(model, blocks, chunk.to(device), device)
            cache._args.append(records)
            cache._hidden.append(None)
            cache.shapes.append((hidden.dtype, tuple(hidden.shape)))
            cache.update(len(cache._args) - 1, hidden)
        return cache

    def __len__(self) -> int:
        return len(self._args)

    def _file(self, k: int) -> Path:
        return self.directory / f"{self.tag}-microbatch{k:05d}.safetensors"

    def hidden(self, k: int) -> Tensor:
        if self.directory is None:
            return self._hidden[k]
        from safetensors.torch import load_file

        return load_file(str(self._file(k)))["hidden"].to(self.device)

    def update(self, k: int, x: Tensor) -> None:
        self.shapes[k] = (x.dtype, tuple(x.shape))
        if self.directory is None:
            self._hidden[k] = x
            return
        from safetensors.torch import save_file

        save_file({"hidden": x.detach().to("cpu").contiguous()}, str(self._file(k)))

    def args(self, k: int, block: int) -> tuple[tuple, dict]:
        return self._args[k][block]

    def tokens(self) -> int:
        return sum(shape[0] * shape[1] for _, shape in self.shapes)

    def restore(self, inputs: Sequence[Tensor]) -> bool:
        """Take saved inputs of a resumed block in place of the captured ones; False where they do not fit."""
        if len(inputs) != len(self) or any(tuple(inputs[k].shape) != shape for k, (_, shape) in enumerate(self.shapes)):
            return False
        for k, (dtype, _) in enumerate(self.shapes):
            self.update(k, inputs[k].to(device=self.device, dtype=dtype))
        return True

    def view(self) -> "CachedInputs":
        """The micro-batches' hidden states as a read-only sequence, read one at a time (for stores that save them)."""
        return CachedInputs(self)


class CachedInputs(Sequence):
    def __init__(self, cache: ActivationCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, k):
        return self.cache.hidden(k)

    @property
    def shapes(self) -> list[tuple[torch.dtype, tuple]]:
        return list(self.cache.shapes)


def run_block(block: nn.Module, index: int, cache: ActivationCache, k: int) -> Tensor:
    """Block `index` on micro-batch k; its output hidden states."""
    args, kwargs = cache.args(k, index)
    out = block(cache.hidden(k), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, device: torch.device) -> tuple[Tensor, list]:
    """Run the model up to its first block and record, for every block, the arguments the model passes it.

    Blocks are replaced by identities for this one call, so each block's own arguments (its mask type,
    its rotary embedding) are recorded without computing any block.
    """
    records: list[Any] = [None] * len(blocks)
    hidden: list[Tensor] = []

    def identity(i: int):
        def forward(*args, **kwargs):
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                hidden.append(x)
            records[i] = (rest, kwargs)
            if i == len(blocks) - 1:
                raise _Stop
            return x
        return forward

    for i, block in enumerate(blocks):
        block.forward = identity(i)
    restore = _outside_blocks_to(model, blocks, device)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for block in blocks:
            del block.forward
        restore()
    return hidden[0], records


def _outside_blocks_to(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move every parameter and buffer that is not inside the blocks to `device`; returns the undo."""
    moved: list[tuple[dict, str, Tensor]] = []

    def visit(module: nn.Module) -> None:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device != device and tensor.device.type != "meta":  # meta: streamed, unused
                    moved.append((store, name, tensor))
                    if isinstance(tensor, nn.Parameter):
                        store[name] = nn.Parameter(tensor.data.to(device), requires_grad=tensor.requires_grad)
                    else:
                        store[name] = tensor.to(device)
        for child in module.children():
            if child is not blocks:
                visit(child)

    visit(model)

    def undo() -> None:
        for store, name, tensor in moved:
            store[name] = tensor
    return undo
