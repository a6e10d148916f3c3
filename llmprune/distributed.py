"""torch.distributed helpers: split the calibration micro-batches across ranks, sum solver statistics,
share the solves of a block. In a single process every helper is a no-op.

Started by torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in the environment): NCCL when the
compute device is a GPU, gloo on CPUs. Nothing here knows of models or files.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank of world (0 of 1 in a single process)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> tuple[int, list[T]]:
        """This rank's contiguous share of `items` and the index of its first item; shares differ by at most one."""
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        size = base + (self.rank < extra)
        return start, list(items[start:start + size])

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce a sum in place; returns the tensor."""
        if self.active:
            torch.distributed.all_reduce(tensor)
        return tensor

    def sum_int(self, value: int) -> int:
        if not self.active:
            return value
        return int(self.sum_(torch.tensor([value], dtype=torch.int64, device=self._comm_device())).item())

    def cat(self, tensor: Tensor, sizes: Sequence[int], dim: int = -1) -> Tensor:
        """Every rank's `tensor` joined along `dim` in rank order; sizes[r]: rank r's length along `dim`."""
        if not self.active:
            return tensor
        pad = list(tensor.shape)
        pad[dim] = max(sizes) - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s; returns it."""
        if self.active:
            torch.distributed.broadcast(tensor, src)
        return tensor

    def broadcast_object(self, value: Any, src: int) -> Any:
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]

    def all_equal(self, value: Any) -> bool:
        """Whether every rank passed an equal (picklable) value."""
        if not self.active:
            return True
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return all(v == gathered[0] for v in gathered)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _comm_device(self) -> torch.device:
        if self.active and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = Dist()


def env_int(name: str, default: int, least: int = 0) -> int:
    """An integer torchrun's environment sets (WORLD_SIZE, LOCAL_RANK, ...), or an error naming the variable."""
    text = os.environ.get(name, str(default)).strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) < least:
        raise LlmpruneError(f"environment variable {name}={text!r} is not a whole number of at least {least}; unset it, "
                            "or start the job with torchrun, which sets it.")
    return int(text)


def from_environment(device: torch.device | None = None) -> Dist:
    """The job torchrun started (initialising the process group once), or the single process."""
    world = env_int("WORLD_SIZE", 1, least=1)
    if world <= 1:
        return SINGLE
    dist = torch.distributed
    if not dist.is_available():
        raise LlmpruneError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process.")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LlmpruneError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the job with torchrun "
                                "(torchrun --nproc-per-node N -m llmprune prune ...).")
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend)
        log.info("rank %d of %d (%s)", dist.get_rank(), world, backend)
    return Dist(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, `cuda` means this process's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and env_int("WORLD_SIZE", 1, least=1) > 1:
        return torch.device("cuda", env_int("LOCAL_RANK", 0))
    return device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
