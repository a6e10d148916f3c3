"""The calibration forward's masked attention on a CPU, cut to the keys each query can see.

transformers builds a boolean mask for a sliding-window layer even where the window covers the whole sequence
(Gemma-3's 512 at seqlen 512), and torch's CPU attention kernel (scaled_dot_product_attention) computes every
query-key block under a mask, where with `is_causal` and no mask it skips the blocks above the diagonal. So
`chunked_sdpa`, in place of transformers' SDPA function while the calibration loop runs the blocks:

- a mask that is the causal triangle for every sequence and head goes as `is_causal` with no mask;
- any other boolean mask shared by every sequence (a window shorter than the sequence) is cut into chunks of
  CHUNK queries, each against the keys from the first to the last one its rows let through, with its slice of
  the mask (a query row's output depends only on its own row of scores);
- everything else (no mask, a padding mask that differs between sequences, a float mask, dropout, a position
  bias, a KV cache, a short sequence, another device) goes to transformers' function whole, unchanged.

Measured on this project's 2-core CPUs (AMD EPYC Zen 4, fp32, 2026-12-07), one call, ms: a causal boolean mask
whole / as `is_causal` / in 64-query chunks: 4 × 512 tokens, 9 heads of 64 (SmolLM2) 20.8 / 18.8 / 17.2;
1 × 2048, 32 heads of 128 580.7 / 303.9 / 501.2; 4 × 512, 4 heads of 256 (Gemma-3) 35.1 / 32.5 / 29.9; 1 × 2048,
same heads 129.9 / 76.8 / 105.2. `is_causal` is never slower than the whole masked call and is much faster at
2048 tokens, so the triangle takes it; chunks are for the windows it cannot express. The values are the same to
rounding either way (2.7e-7 on unit-normal inputs).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

NAME = "llmprune_chunked_sdpa"
CHUNK = 64  # queries per chunk: 64 / 128 / 256 measured 19.6 / 22.8 / 21.4 ms on Gemma-3's 4 × 512 tokens


def _shared_rows(mask: Tensor | None, q_len: int, kv_len: int) -> Tensor | None:
    """The [q_len, kv_len] boolean mask (True = may attend) every sequence and head uses, or None where there is
    none or it differs between sequences or heads."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        return None
    first = mask[0, 0]
    if (mask.shape[0] > 1 and mask.stride(0) != 0) or (mask.shape[1] > 1 and mask.stride(1) != 0):
        if not bool((mask == first).all()):
            return None
    return first


def chunked_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention (the same signature and result): a causal mask as `is_causal`, another boolean
    mask shared by the sequences over chunks of CHUNK queries, each against the keys from the first to the last one
    the chunk's mask rows let through; the rest whole."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    rows = None
    if (query.device.type == "cpu" and not dropout and kwargs.get("position_bias") is None and q_len >= 2 * CHUNK
            and q_len == kv_len and not kwargs.get("output_attentions", False)):
        rows = _shared_rows(attention_mask, q_len, kv_len)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if torch.equal(rows, torch.ones(q_len, kv_len, dtype=torch.bool, device=rows.device).tril_()):
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, is_causal=True,
                                      **kwargs)
    seen = rows.reshape(-1, CHUNK, kv_len).any(1) if q_len % CHUNK == 0 else None
    parts = []
    for c, start in enumerate(range(0, q_len, CHUNK)):
        stop = min(start + CHUNK, q_len)
        visible = (seen[c] if seen is not None else rows[start:stop].any(0)).nonzero()
        if len(visible) == 0:  # no key for any query of the chunk: as the whole call would do it
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        lo, hi = int(visible[0]), int(visible[-1]) + 1
        mask = rows[start:stop, lo:hi].expand(query.shape[0], 1, stop - start, hi - lo)
        out, _ = sdpa_attention_forward(module, query[:, :, start:stop], key[:, :, lo:hi], value[:, :, lo:hi], mask,
                                        dropout=0.0, scaling=scaling, is_causal=False, **kwargs)
        parts.append(out)
    return torch.cat(parts, dim=1), None


@contextmanager
def chunked_attention(blocks: nn.Module, device: torch.device):
    """While in the context, the blocks' attention modules whose config says "sdpa" run `chunked_sdpa` (on a CPU
    only: the GPU kernels were not measured here)."""
    configs = []
    if torch.device(device).type == "cpu":
        seen_ids = set()
        for module in blocks.modules():
            config = getattr(module, "config", None)
            if (config is not None and id(config) not in seen_ids
                    and getattr(config, "_attn_implementation", None) == "sdpa"):
                seen_ids.add(id(config))
                configs.append(config)
    if configs:
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(NAME, chunked_sdpa)
    for config in configs:
        _set_implementation(config, NAME)
    try:
        yield
    finally:
        for config in configs:
            _set_implementation(config, "sdpa")


def _set_implementation(config, name: str) -> None:
    # the internal attribute where transformers 5 keeps it: its property setter also rewrites every sub-config,
    # which may have chosen another implementation (each config found in the blocks is set on its own here)
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name
