"""Run compressed-tensors 0.14's own sparse compressors on a checkpoint (interoperability check).

compressed-tensors 0.14.0.1 is the last release with the sparse compressors and pins transformers<5, so
it is installed apart from llmprune (`pip install --no-deps --target DIR compressed-tensors==0.14.0.1
loguru`) and this script runs with DIR on PYTHONPATH. Only its compressor modules are used.

    python eval/ct014_interop.py decompress CHECKPOINT_DIR OUT.safetensors
        their decompressor reads the checkpoint (format from config.json); every tensor goes to OUT
    python eval/ct014_interop.py compress DENSE_DIR OUT_DIR FORMAT
        their compressor writes DENSE_DIR's weights in FORMAT (sparse-bitmask or sparse-24-bitmask) to
        OUT_DIR/model.safetensors with the config.json block their ModelCompressor writes
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def _compressor(fmt: str, **fields):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig

    config = SparsityCompressionConfig.load_from_registry(fmt, **fields)
    return BaseCompressor.load_from_registry(fmt, config=config), config


def decompress(checkpoint: str, out: str) -> None:
    from safetensors.torch import save_file

    sc = json.loads((Path(checkpoint) / "config.json").read_text())["quantization_config"]["sparsity_config"]
    compressor, _ = _compressor(sc["format"], **{k: v for k, v in sc.items() if k != "format"})
    tensors = {name: tensor.contiguous() for name, tensor in compressor.decompress(checkpoint)}
    save_file(tensors, out)
    print(json.dumps({"format": sc["format"], "tensors": len(tensors)}))


def compress(dense_dir: str, out_dir: str, fmt: str) -> None:
    import compressed_tensors
    from safetensors.torch import load_file, save_file

    src, dst = Path(dense_dir), Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    structure = "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    targets = {k[: -len(".weight")] for k, v in state.items()
               if k.endswith(".weight") and v.dim() == 2 and ".layers." in k and float((v == 0).float().mean()) > 0.25}
    compressor, config = _compressor(fmt, targets=["Linear"], sparsity_structure=structure)
    compressed = compressor.compress(state, compression_targets=targets)
    save_file({k: v.contiguous() for k, v in compressed.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                                  "sparsity_config": config.model_dump(), "transform_config": {}}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    print(json.dumps({"format": fmt, "compressed": len(targets), "version": compressed_tensors.__version__}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"decompress": decompress, "compress": compress}[command](*args)
