"""Bit-for-bit parity of pruning between this tree and another commit, on the same machine in one run.

For a refactor that must not change results: every case of a matrix (architectures × methods × patterns ×
schedules, activations on disk, streaming, OWL, DSnoT, mixture of experts) is pruned on tiny random models by
this tree and by a git worktree of COMMIT, and every tensor of every pruned model, every linear's reported
sparsity and the allocation are compared. Prints one row per case; exit code 1 if any differs.

    python eval/parity.py against COMMIT [--cases SUBSTRING]
    python eval/parity.py dump OUT.json [--cases SUBSTRING]     # what `against` runs in each tree
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ARCHS = ["llama", "gpt2", "opt", "gemma3", "qwen2", "phi"]
CASES = (
    [(arch, method, pattern, schedule) for arch in ARCHS for method in ("magnitude", "wanda", "sparsegpt")
     for pattern in ("unstructured", "2:4") for schedule in ("sequential", "two-pass")
     if not (method == "magnitude" and schedule == "two-pass")]
    + [(arch, "sparsegpt", "unstructured", extra) for arch in ("llama", "opt") for extra in ("offload", "stream")]
    + [("llama", "wanda", "unstructured", "owl"), ("llama", "sparsegpt", "unstructured", "owl"),
       ("qwen2", "wanda", "unstructured", "dsnot"), ("llama", "sparsegpt", "2:4", "dsnot"),
       ("mixtral", "wanda", "unstructured", "sequential"), ("mixtral", "sparsegpt", "2:4", "two-pass"),
       ("qwen2_moe", "sparsegpt", "unstructured", "stream"), ("llama", "sparsegpt", "unstructured", "overrides")]
)


def case_name(case) -> str:
    return "-".join(case).replace(":", "of")


def digest(tensor) -> str:
    import torch

    return hashlib.sha256(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def moe_model(family: str):
    """A tiny random mixture-of-experts model (as tests/test_moe.py builds them, without importing llmprune)."""
    import torch
    import transformers as T

    common = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2)
    config = (T.MixtralConfig(intermediate_size=32, num_local_experts=4, **common) if family == "mixtral" else
              T.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                               num_experts=4, **common))
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def run_case(case, work: Path, text: Path) -> dict:
    import torch

    from llmprune import api

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import byte_tokenizer, tiny_model  # builds models from transformers configs only

    arch, method, pattern, extra = case
    source = work / f"src-{arch}"
    if not source.exists():
        model = moe_model(arch) if arch in ("mixtral", "qwen2_moe") else tiny_model(arch)
        model.save_pretrained(source, max_shard_size="60KB")
        byte_tokenizer().save_pretrained(source)
    fields = dict(method=method, calibration=str(text), nsamples=8, seqlen=32, seed=0)
    if pattern == "2:4":
        fields["pattern"] = "2:4"
    else:
        fields["sparsity"] = 0.5
    options = dict(device="cpu", microbatch=2)
    if extra == "two-pass":
        fields["sequential"] = False
    elif extra == "offload":
        options["offload_activations"] = str(work / f"act-{case_name(case)}")
    elif extra == "stream":
        options["stream"] = True
    elif extra == "owl":
        fields.update(allocation="owl", owl_lambda=0.1)
    elif extra == "dsnot":
        fields["refine"] = "dsnot"
    elif extra == "overrides":
        fields["overrides"] = {r"mlp\.down_proj": 0.3}
    out = work / f"out-{case_name(case)}"
    torch.manual_seed(0)
    _, report = api.prune(str(source), out=out, format="dense", **fields, **options)
    state = {}
    for file in sorted(out.glob("*.safetensors")):
        from safetensors.torch import load_file

        state.update(load_file(str(file)))
    shutil.rmtree(out)
    return {"tensors": {k: digest(v) for k, v in sorted(state.items())},
            "linears": [(r["name"], r["sparsity"], r["target"]) for r in report["linears"]],
            "allocation": report.get("allocation")}


def dump(out: str, only: str | None) -> None:
    import llmprune

    results = {"llmprune_file": llmprune.__file__, "machine": platform.processor() or platform.machine(), "cases": {}}
    text = Path(REPO / "llmprune" / "_data" / "wikitext2_valid.txt")
    with tempfile.TemporaryDirectory(prefix="llmprune-parity-") as work:
        snippet = Path(work) / "calib.txt"
        snippet.write_text(text.read_text(encoding="utf-8")[:30000], encoding="utf-8")
        for case in CASES:
            if only and only not in case_name(case):
                continue
            try:
                results["cases"][case_name(case)] = run_case(case, Path(work), snippet)
            except Exception as exc:  # a case the tree cannot run is reported, not fatal
                results["cases"][case_name(case)] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    Path(out).write_text(json.dumps(results, indent=1))


def against(commit: str, only: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="llmprune-parity-base-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), commit], check=True,
                       capture_output=True)
        try:
            outs = {}
            for name, tree in (("base", base), ("here", REPO)):  # this script in both; `import llmprune` from the tree
                outs[name] = Path(tmp) / f"{name}.json"
                command = [sys.executable, str(Path(__file__)), "dump", str(outs[name])] + (["--cases", only] if only else [])
                subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
            a, b = (json.loads(outs[k].read_text()) for k in ("base", "here"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
    if not a["llmprune_file"].startswith(str(base)):
        raise SystemExit(f"the base run imported {a['llmprune_file']}, not the worktree's llmprune")
    print(f"parity of {REPO} against {commit} on {a['machine']}, {len(a['cases'])} cases")
    failed = 0
    for name in a["cases"]:
        x, y = a["cases"][name], b["cases"].get(name)
        if y is None:
            verdict = "missing here"
        elif "error" in x or "error" in y:
            verdict = f"error: base {x.get('error')} | here {y.get('error')}"
        else:
            differ = [k for k in x["tensors"] if x["tensors"][k] != y["tensors"].get(k)] + sorted(set(y["tensors"]) - set(x["tensors"]))
            verdict = ("same" if not differ and x["linears"] == y["linears"] and x["allocation"] == y["allocation"]
                       else f"DIFFERENT ({len(differ)} tensors, e.g. {differ[:2]}; linears same: {x['linears'] == y['linears']})")
        failed += verdict != "same"
        print(f"{name:45s} {verdict}")
    print(f"{len(a['cases']) - failed} of {len(a['cases'])} cases bit for bit the same")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--cases")
    g = sub.add_parser("against")
    g.add_argument("commit")
    g.add_argument("--cases")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out, args.cases)
    else:
        sys.exit(against(args.commit, args.cases))


if __name__ == "__main__":
    main()
