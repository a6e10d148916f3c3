"""Perplexity by the SparseGPT protocol: one token stream, non-overlapping windows, ppl = exp(mean window loss)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from llmprune.errors import LlmpruneError


def perplexity(model, tokens: Tensor, *, seqlen: int, max_windows: int | None = None, start: int = 0,
               batch_size: int = 1, device: torch.device | str = "cpu") -> dict:
    """Perplexity of `model` on tokens [1, n]: windows of `seqlen` from token `start` on, at most `max_windows`."""
    stream = tokens[0, start:]
    windows = stream.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise LlmpruneError(
            f"the evaluation text has {stream.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
            "use a smaller --seqlen or a longer text."
        )
    ids = stream[: windows * seqlen].reshape(windows, seqlen)
    from tqdm.auto import tqdm

    losses = []
    with torch.no_grad():
        for batch in tqdm(ids.split(batch_size), desc="perplexity", unit="batch", disable=None, leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [b, seqlen-1, vocab]
            loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)  # [b]
            losses.append(loss.double().cpu())
    mean_loss = torch.cat(losses).mean().item()
    return {"ppl": math.exp(mean_loss), "mean_loss": mean_loss, "seqlen": seqlen, "windows": windows, "start": start}
