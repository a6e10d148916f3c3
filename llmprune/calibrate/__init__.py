"""The layer-by-layer pruning loop: the only place that runs decoder blocks.

Block 0's inputs are captured with every argument the model passes each block (masks, position embeddings, ...).
Then, block by block, hooks on the target linears feed the solvers, each linear is pruned, and the calibration
windows leave the block as the next block's inputs. The modules:

- loop.py: the block loop (pruning, and OWL's dense pass), block placement on the compute device, progress;
- cache.py: the calibration activations (in memory or on disk) and the capture of block 0's inputs;
- pruner.py: the hooks, the grouping of linears that read one input under one solver, the solves;
- lockstep.py: the sequential schedule's greenlets;
- sharing.py: solves shared by torch.distributed ranks;
- attention.py: on a CPU, the blocks' causal attention in query chunks while the loop runs them.

Two schedules (plan.py chooses):
- sequential (default): one pass per block. The micro-batches run as cooperative greenlets that all pause at each
  linear; once every micro-batch has reached it, the linear is pruned and the micro-batches continue through the
  pruned weight. Every linear is thus calibrated on inputs that already see the pruned linears upstream (the
  "true-sequential" order of the GPTQ authors' scripts), at the cost of a single forward pass.
- two-pass (the reference scripts' schedule): a dense pass gathers every linear's statistics, all linears are
  pruned, and a second pass through the pruned block gives the next block's inputs.
"""
from llmprune.calibrate.cache import ActivationCache
from llmprune.calibrate.loop import BlockStore, memory_in_use, outlier_ratios, placed, prune_model
from llmprune.calibrate.pruner import FALLBACK, BlockPruner, LinearResult

__all__ = ["ActivationCache", "BlockPruner", "BlockStore", "FALLBACK", "LinearResult", "memory_in_use",
           "outlier_ratios", "placed", "prune_model"]
