"""SparseGPT 2:4 on a random-weight mixture-of-experts model versus the dense model of the same width.

Builds a Mixtral-architecture checkpoint (8 experts, top-2, ~0.5B parameters by default) and a Llama of the
same hidden and intermediate width and depth (one dense MLP where the MoE has eight experts), saved in bf16;
prunes both with SparseGPT 2:4 in fp32 on the CPU (the MoE twice: loaded whole, and streamed block by block) and
reports wall time, peak RSS and, for the MoE, the share of the pruning time spent in the experts' solves and the
spread of tokens over experts.

    python eval/bench_moe.py --text ../shared/data/wikitext2/valid.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import machine_info, run  # noqa: E402  (same folder: one way to time and measure a run)


def write_models(work: Path, *, layers: int, hidden: int, intermediate: int, experts: int) -> dict[str, tuple[Path, int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig

    from llmprune.models import resolve_source

    source = resolve_source("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=2048,
                  tie_word_embeddings=True)
    configs = {"moe": MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **common), "dense": LlamaConfig(**common)}
    made = {}
    for name, config in configs.items():
        path = work / name
        if not (path / "config.json").is_file():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            (path / "params.txt").write_text(str(sum(p.numel() for p in model.parameters())))
            del model
        made[name] = (path, int((path / "params.txt").read_text()))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--workdir", default="/tmp/llmprune-bench-moe")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(args.workdir)
    info = {**machine_info(), "method": "sparsegpt 2:4", "compute_dtype": "float32",
            "calibration": f"{args.nsamples} x {args.seqlen}", "experts": args.experts, "top_k": 2,
            "width": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers}}
    print(json.dumps(info), flush=True)
    rows = []
    models = write_models(work, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, experts=args.experts)
    runs = [("moe", "--no-stream"), ("moe", "--stream"), ("dense", "--no-stream")]
    for model, streaming in runs:
        path, params = models[model]
        name = model + ("-streamed" if streaming == "--stream" else "")
        out = work / f"out-{name}"
        command = [sys.executable, "-m", "llmprune", "prune", str(path), "--method", "sparsegpt", "--pattern", "2:4",
                   "--calib", args.text, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu",
                   "--dtype", "float32", "--out", str(out), "--overwrite", "--json", streaming]
        result = run(command, work / f"out-{name}.log")
        report = json.loads((out / "llmprune.json").read_text())
        row = {"model": name, "params": params, **result, "prune_s": round(report["timings"]["prune_s"], 1),
               "sparsity": round(report["sparsity"], 4)}
        experts = [r for r in report["linears"] if r.get("tokens") is not None]
        if experts:
            row["expert_solve_s"] = round(sum(r["seconds"] for r in experts), 1)
            row["expert_solve_share"] = round(row["expert_solve_s"] / report["timings"]["prune_s"], 3)
            tokens = [r["tokens"] for r in experts if ".gate_up_proj." in r["name"]]
            row["tokens_per_expert"] = {"min": min(tokens), "max": max(tokens), "mean": round(sum(tokens) / len(tokens))}
            row["fallbacks"] = sum(1 for r in experts if r.get("fallback"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
