"""One Plan per pruning run, decided once from the recipe, the model and the machine: where the work runs, in
which schedule, in micro-batches of what size, where the calibration activations live, whether the model streams,
how often the partial run is saved. Every later step reads it; `--resume` compares its `to_dict()`.

    >>> plan = decide(recipe, model, windows, device=resolve_device("auto"))   # doctest: +SKIP
    >>> plan.sequential, plan.activations, plan.sparsity_of(3, "model.layers.3.mlp.down_proj")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import models
from llmprune.distributed import SINGLE, Dist, env_int
from llmprune.errors import LlmpruneError
from llmprune.recipe import Recipe

log = logging.getLogger(__name__)

TOKENS_PER_MICROBATCH = 2048  # keeps the block's activations cache-sized on CPUs; measured fastest for SmolLM2
CHECKPOINT_SECONDS = 60.0  # least time between two saves of a partial run's state


@dataclass(frozen=True)
class Plan:
    """What a run does where. `block_sparsity` is OWL's allocation, known after its dense pass (`with_allocation`)."""

    recipe: Recipe
    device: torch.device
    dtype: str  # the model's, as loaded (also the saved dtype)
    seqlen: int  # the recipe's, capped at the model's positions
    microbatch: int | None  # calibration windows per forward call; None without calibration data
    sequential: bool  # lockstep (every linear calibrated on pruned upstream outputs); False: two-pass
    activations: Path | None  # a directory holding one file per micro-batch; None: in memory, on the device
    streamed: bool  # blocks read from the safetensors shards one at a time
    checkpoint_every: float
    processes: int
    notes: tuple[str, ...] = ()
    block_sparsity: tuple[float, ...] | None = None

    @property
    def needs_data(self) -> bool:
        return self.recipe.needs_data

    def sparsity_of(self, block: int, name: str) -> float:
        """The sparsity of linear `name` (full name) of block `block`: an override, else the block's allocation,
        else the recipe's."""
        value = self.recipe.sparsity_override(name)
        if value is not None:
            return value
        return self.recipe.sparsity if self.block_sparsity is None else self.block_sparsity[block]

    def with_allocation(self, block_sparsity) -> "Plan":
        return dataclasses.replace(self, block_sparsity=tuple(float(s) for s in block_sparsity))

    def to_dict(self) -> dict:
        """The options a resumed run must share with the run it continues."""
        return {"recipe": self.recipe.to_dict(), "seqlen": self.seqlen, "dtype": self.dtype, "microbatch": self.microbatch,
                "processes": self.processes, "two_pass": not self.sequential or self.activations is not None}


def decide(recipe: Recipe, model: nn.Module, windows: Tensor | None, *, device: torch.device, seqlen: int | None = None,
           microbatch: int | None = None, activations: str | os.PathLike | None = None, partial: Path | None = None,
           dist: Dist = SINGLE, checkpoint_every: float | None = None, streamed: bool = False,
           notes: tuple[str, ...] = ()) -> Plan:
    """The plan for pruning `model` with `recipe` on `windows` ([nsamples, seqlen] ids, None without data)."""
    seqlen = seqlen if seqlen is not None else capped_seqlen(recipe.seqlen, model)[0]
    sequential = recipe.sequential
    where, sequential, placed_notes = place_activations(activations, windows, model, partial, dist, device, sequential)
    if windows is not None:
        microbatch = microbatch or default_microbatch(seqlen)
    return Plan(recipe=recipe, device=device, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                seqlen=seqlen, microbatch=microbatch if windows is not None else None,
                sequential=sequential and where is None, activations=where, streamed=streamed,
                checkpoint_every=CHECKPOINT_SECONDS if checkpoint_every is None else checkpoint_every,
                processes=dist.world, notes=tuple(notes) + placed_notes)


def default_microbatch(seqlen: int) -> int:
    return max(1, TOKENS_PER_MICROBATCH // max(seqlen, 1))


def capped_seqlen(seqlen: int, model: nn.Module) -> tuple[int, str | None]:
    """(the calibration seqlen, a note where it was capped at the model's maximum positions)."""
    limit = models.max_positions(model)
    if limit is not None and seqlen > limit:
        log.warning("--seqlen %d exceeds the model's max positions; using %d", seqlen, limit)
        return limit, f"seqlen {seqlen} capped to the model's max positions {limit}"
    return seqlen, None


def resolve_device(device: str | torch.device | None) -> torch.device:
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise LlmpruneError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto.") from None
    if resolved.type not in ("cpu", "cuda"):
        raise LlmpruneError(f"device '{name}' is not one llmprune runs on; use cpu, cuda, cuda:N or auto.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LlmpruneError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu.")
    return resolved


def free_memory(device: torch.device | None = None) -> int | None:
    """Free bytes where tensors on `device` live: the GPU's free memory for CUDA, else the host's available memory."""
    if device is not None and device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def activation_bytes(windows: Tensor, model: nn.Module, dist: Dist, sequential: bool) -> int:
    """Memory the calibration activations take in one process. Two-pass holds each micro-batch's block input and
    output (2 hidden states a token); sequential runs every micro-batch through the block in lockstep, so at the
    MLP's down projection each holds its input, the residual, the normed input and the MLP's inner product:
    3 hidden states and one intermediate (5.4 hidden states a token on SmolLM2, measured from peak RSS against
    two-pass; 3 + 1536 / 576 = 5.7 predicted)."""
    config = model.config.get_text_config()
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 3 * hidden + inner if sequential else 2 * hidden
    itemsize = next(model.parameters()).element_size()
    return windows.numel() // dist.world * per_token * itemsize


def place_activations(asked, windows: Tensor | None, model: nn.Module, partial: Path | None, dist: Dist,
                      device: torch.device, sequential: bool) -> tuple[Path | None, bool, tuple[str, ...]]:
    """(where the calibration activations go, whether the sequential schedule runs, notes): the asked directory
    (two-pass: lockstep needs every micro-batch at once); else in memory (on the compute device, where they live)
    with the asked schedule when its activations fit (see `activation_bytes`), in memory with the two-pass schedule
    when only its activations fit, and otherwise in OUT.partial/activations (a temporary directory without --out),
    one micro-batch in memory at a time."""
    if asked is not None:
        if sequential:
            log.warning("activations offloaded to %s: running the two-pass schedule (lockstep needs every "
                        "micro-batch in memory at once)", asked)
        return Path(asked).expanduser(), False, ()
    if windows is None:
        return None, sequential, ()
    free = free_memory(device)
    if free is None:
        return None, sequential, ()
    asked_bytes = activation_bytes(windows, model, dist, sequential)
    if asked_bytes <= free:
        return None, sequential, ()
    needed = activation_bytes(windows, model, dist, False) if sequential else asked_bytes
    if needed <= free:  # only with sequential asked: two-pass needs less
        log.warning("running the two-pass schedule: the sequential one holds every micro-batch's activations at once "
                    "(%.1f GB here), more than the %.1f GB free", asked_bytes / 1e9, free / 1e9)
        return None, False, ("two-pass schedule: the sequential one would not fit the calibration activations in memory",)
    where = partial / "activations" if partial is not None else Path(tempfile.mkdtemp(prefix="llmprune-activations-"))
    log.warning("offloading the calibration activations to %s: they would take %.1f GB, %.1f GB is free", where,
                needed / 1e9, free / 1e9)
    if sequential:
        log.warning("activations offloaded to %s: running the two-pass schedule (lockstep needs every micro-batch in "
                    "memory at once)", where)
    return where, False, ()


def should_stream(directory: Path | None, stream: bool | None, dtype: str | None, *, what: str) -> bool:
    """Whether to read the model block by block from `directory`'s shards: --stream forces it, --no-stream forbids
    it, and by default a model streams when it would take more than half the free memory. `directory` is None where
    no safetensors directory could be had (`what` names the model then)."""
    from llmprune import checkpoint, files

    if stream is False:
        return False
    if directory is None:
        if stream:
            raise LlmpruneError(f"could not fetch the safetensors shards of '{what}' to stream them; check the name "
                                "and your network, or pass a local directory.")
        return False
    if checkpoint.read_format(directory) is not None:
        if stream:
            raise LlmpruneError(f"{directory} is a compressed checkpoint; streaming reads dense safetensors: drop --stream.")
        return False
    if stream:
        return True
    size = sum(f.stat().st_size for f in files.weight_files(directory) if f.is_file())
    wanted = models.parse_dtype(dtype)
    if wanted is not None:
        config = json.loads((directory / "config.json").read_text())
        stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
        size = size * wanted.itemsize // stored.itemsize
    free = free_memory()
    processes = env_int("LOCAL_WORLD_SIZE", 1, least=1)
    if free is None or size <= free / 2 / processes:
        return False
    log.warning("streaming: the model (%.1f GB) would take more than half the free memory (%.1f GB%s); its blocks are "
                "read from disk one at a time", size / 1e9, free / 1e9, f" for {processes} processes" if processes > 1 else "")
    return True
