"""The sequential schedule's lockstep: every micro-batch runs through the block as a greenlet, they all pause at
each linear, the linear is pruned once all have arrived, and they go on through the pruned weight."""
from __future__ import annotations

from typing import Any

import greenlet
from torch import Tensor, nn

from llmprune.calibrate.cache import ActivationCache, run_block
from llmprune.calibrate.pruner import BlockPruner


def run_lockstep(block: nn.Module, index: int, cache: ActivationCache, pruner: BlockPruner,
                 outputs_needed: bool = True) -> list[Tensor] | None:
    """Every micro-batch's output of block `index`, each linear pruned when every micro-batch reached it. Without
    `outputs_needed` (the last block), the micro-batches stop once its last linear is pruned: None."""
    workers = [greenlet.greenlet(lambda k=k: ("done", run_block(block, index, cache, k))) for k in range(len(cache))]
    outputs: list[Any] = [None] * len(workers)
    with pruner.hooks(sync=True):
        while True:
            if not outputs_needed and pruner.linears.keys() <= pruner.pruned:
                for worker in workers:  # the rest of the block's forward feeds nothing: unwind it (GreenletExit)
                    if not worker.dead:
                        worker.throw()
                return None
            events = []
            for k, worker in enumerate(workers):
                if worker.dead:
                    continue
                event = worker.switch()
                if event[0] == "done":
                    outputs[k] = event[1]
                events.append(event)
            if not events:
                break
            kinds = {e if e[0] == "sync" else ("done",) for e in events}
            if len(kinds) != 1:
                raise RuntimeError(f"micro-batches took different paths through block {index}: {kinds}")
            if events[0][0] == "sync":
                pruner.prune_all(list(events[0][1]))
    return outputs
