"""llmprune: one-shot LLM pruning (SparseGPT, Wanda, magnitude) for any decoder model."""
__version__ = "0.1.0"

from llmprune.errors import LlmpruneError  # noqa: E402


def prune(*args, **kwargs):
    """Prune a model; see llmprune.api.prune."""
    from llmprune.api import prune as _prune

    return _prune(*args, **kwargs)


def load(spec=None, *, dtype=None, device=None, sparse_kernels: bool = False):
    """Load (model, tokenizer) from a pruned directory (dense or compressed), a Hub id, a .gguf file or 'smollm2'.

    sparse_kernels=True swaps the pruned linears for SparseLinear layers (compressed weights only, run by
    llmprune's CUDA kernels where they apply) before the model moves to `device`, so the dense weights never
    reach the GPU.
    """
    from llmprune.checkpoint import load_model

    model, tokenizer, _ = load_model(spec, dtype=dtype)
    if sparse_kernels:
        from llmprune.deploy import sparsify

        sparsify(model)
    if device is not None:
        model.to(device)
    return model, tokenizer


def perplexity(model, tokenizer, text_source: str, *, seqlen: int = 2048, max_windows=None, start: int = 0, **kwargs):
    """Perplexity of a loaded model on wikitext2, c4 or a local text file (SparseGPT protocol)."""
    from llmprune.data import eval_tokens
    from llmprune.evaluate import perplexity as _ppl

    return _ppl(model, eval_tokens(text_source, tokenizer, seqlen=seqlen), seqlen=seqlen,
                max_windows=max_windows, start=start, **kwargs)


__all__ = ["LlmpruneError", "prune", "load", "perplexity", "__version__"]
