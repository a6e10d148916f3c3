"""llmprune: one-shot LLM pruning (SparseGPT, Wanda, magnitude) for any decoder model."""
from llmprune.version import __version__  # noqa: E402

import importlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

from llmprune.errors import LlmpruneError  # noqa: E402


def _register_with_transformers() -> None:
    """Make transformers' from_pretrained load llmprune checkpoints (hf.py). Never breaks the import it rides on."""
    try:  # importing hf registers it; mid-import (hf's own `import transformers` got here) it registers when done
        importlib.import_module("llmprune.hf")
    except Exception as exc:  # an unexpected transformers: plain transformers still refuses our files (formats.GUARD)
        import logging

        logging.getLogger(__name__).warning("llmprune could not register its loader with transformers (%s); "
                                            "use llmprune.load for compressed checkpoints", exc)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Registers with transformers right after `import transformers` runs, so that `import llmprune` stays cheap
    (transformers' quantizer registry costs ~4 s to import; the CLI's --help must not pay it)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # resource readers and the like come from the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register_with_transformers()


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())


def prune(*args, **kwargs):
    """Prune a model; see llmprune.api.prune."""
    from llmprune.api import prune as _prune

    return _prune(*args, **kwargs)


def load(spec=None, *, dtype=None, device=None, sparse_kernels: bool = False, values_dtype=None,
         revision: str | None = None):
    """Load (model, tokenizer) from a pruned directory (dense or compressed), a Hub id (`owner/name`, or
    `owner/name@branch`; or pass revision=), a .gguf file or 'smollm2'.

    sparse_kernels=True swaps the pruned linears for SparseLinear layers (compressed weights only, run by
    llmprune's kernels: compiled C++ on a CPU, CUDA on a GPU), packed for `device` before the model moves there,
    so the dense weights never reach the GPU. values_dtype (torch.bfloat16, torch.float16) stores the kept values
    in that dtype on a CPU while the rest of the model keeps `dtype`: half the bytes a weight at decode.

    >>> model, tokenizer = llmprune.load("m50", sparse_kernels=True, values_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    from llmprune.checkpoint import load_model

    if values_dtype is not None:
        import torch

        if not sparse_kernels:
            raise LlmpruneError("values_dtype= applies to the sparse kernels' weights; pass it with sparse_kernels=True.")

        from llmprune.models import parse_dtype

        values_dtype = values_dtype if isinstance(values_dtype, torch.dtype) else parse_dtype(values_dtype)
        if values_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise LlmpruneError(f"values_dtype must be float32, bfloat16 or float16; got {values_dtype}.")

    if revision is not None:
        if spec is None or "@" in str(spec):
            raise LlmpruneError("pass a Hub id and revision= (or owner/name@revision), not both or neither.")
        spec = f"{spec}@{revision}"
    model, tokenizer, _ = load_model(spec, dtype=dtype)
    if sparse_kernels:
        from llmprune.deploy import sparsify

        sparsify(model, device=device, values_dtype=values_dtype)
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
