"""Checkpoint sizes and save/load times: dense vs compressed (compressed-tensors sparse layouts), one run.

Prunes SmolLM2-135M at 50% unstructured and at 2:4 (magnitude by default: the layout, not the solver, is
measured here), saves each pruned model dense and compressed, and loads each back with llmprune.load.
Weight bytes are the safetensors files; "linear" counts only the pruned linear layers.

    python eval/bench_checkpoints.py [--method magnitude] [--model smollm2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    import llmprune
    from llmprune import checkpoint, files
    from llmprune.describe import describe

    work = Path(tempfile.mkdtemp(prefix="llmprune-ckpt-bench-"))
    rows = []
    for pattern in ("unstructured", "2:4"):
        model, report = llmprune.prune(args.model, method=args.method, sparsity=0.5, pattern=pattern,
                                       calibration="wikitext2-valid", nsamples=16, seqlen=256, device="cpu")
        _, tokenizer = llmprune.load(args.model)
        targets = {r["name"] for r in report["linears"]}
        for fmt in ("dense", "compressed"):
            out = work / f"{pattern.replace(':', 'of')}-{fmt}"
            started = time.perf_counter()
            checkpoint.save(model, tokenizer, out, report=json.loads(json.dumps(report)), fmt=fmt, pruned=targets)
            save_s = time.perf_counter() - started
            started = time.perf_counter()
            loaded, _ = llmprune.load(str(out))
            load_s = time.perf_counter() - started
            ref = model.state_dict()
            exact = all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
            info = describe(out)
            rows.append({"pattern": pattern, "format": info["format"], "weight_bytes": sum(f.stat().st_size for f in files.weight_files(out)),
                         "linear_bytes": info["sizes"]["linear_stored_bytes"], "save_s": save_s, "load_s": load_s, "exact": exact})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        dense = next(r for r in rows if r["pattern"] == row["pattern"] and r["format"] == "dense")
        row["weight_ratio"] = row["weight_bytes"] / dense["weight_bytes"]
        row["linear_ratio"] = row["linear_bytes"] / dense["linear_bytes"]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; model {args.model}, method {args.method}, 50%")
    print(f"{'pattern':<13} {'format':<18} {'weights MiB':>11} {'ratio':>6} {'linear MiB':>10} {'ratio':>6} {'save s':>7} {'load s':>7} exact")
    for r in rows:
        print(f"{r['pattern']:<13} {r['format']:<18} {r['weight_bytes'] / 2**20:>11.1f} {r['weight_ratio']:>6.3f} "
              f"{r['linear_bytes'] / 2**20:>10.1f} {r['linear_ratio']:>6.3f} {r['save_s']:>7.2f} {r['load_s']:>7.2f} {r['exact']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
