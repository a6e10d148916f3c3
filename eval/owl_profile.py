"""OWL's view of a model: each block's outlier ratio of the dense model's Wanda scores, for several M, and the
block sparsities OWL derives from them; optionally a recipe with the mirrored allocation (more outliers →
higher sparsity), to test whether a solver prefers the opposite of OWL's direction on this model.

    python eval/owl_profile.py --calib CALIB.txt [--model smollm2] [--sparsity 0.7] [--ms 3,5,7,10]
        [--mirror-recipe OUT.yaml --method sparsegpt] [--json OUT.json]

Calibration as in eval/bench_prune.py (64 windows × 512 tokens, seed 0). One dense forward pass per M.
The mirrored recipe sets each block's sparsity through `overrides`; its mean over blocks stays the target.
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", required=True, help="calibration text (.txt or .jsonl), e.g. the benchmark's calibration split")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--lam", type=float, default=0.08, help="OWL's λ")
    ap.add_argument("--ms", default="3,5,7,10", help="comma-separated values of OWL's M")
    ap.add_argument("--mirror-recipe", help="write a recipe with OWL's allocation (first M) mirrored around the target")
    ap.add_argument("--method", default="sparsegpt", help="the mirrored recipe's method")
    ap.add_argument("--json", help="also write the profile here")
    args = ap.parse_args()

    import torch

    from llmprune import allocation, calibrate, data, models
    from llmprune.plan import decide
    from llmprune.recipe import Recipe

    model, tokenizer, _ = models.load_model(args.model)
    windows = data.calibration_windows(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    blocks_name, _ = models.find_blocks(model)
    profile = {}
    for m in (float(v) for v in args.ms.split(",")):
        plan = decide(Recipe.create(method="wanda", sparsity=args.sparsity, owl_m=m), model, windows,
                      device=torch.device("cpu"), seqlen=windows.shape[1])
        ratios, sizes = calibrate.outlier_ratios(model, windows, plan)
        sparsities = allocation.owl_blocks(ratios, sizes, args.sparsity, lam=args.lam)
        profile[f"{m:g}"] = {"outlier_ratios": ratios, "block_sparsity": sparsities}
        print(f"M = {m:g}: outlier ratio (%) by block: " + " ".join(f"{100 * r:.2f}" for r in ratios))
        print(f"        OWL sparsity by block:     " + " ".join(f"{s:.3f}" for s in sparsities))
    if args.mirror_recipe:
        first = profile[next(iter(profile))]["block_sparsity"]
        mirrored = [2 * args.sparsity - s for s in first]
        lines = [f"# OWL's allocation mirrored around {args.sparsity:g} (a diagnostic, not a method): "
                 "more outliers → higher sparsity.",
                 f"method: {args.method}", f"sparsity: {args.sparsity:g}", "pattern: unstructured", "overrides:"]
        prefix = blocks_name.replace(".", r"\.")
        lines += [f"  '{prefix}\\.{i}\\.': {s:.6f}" for i, s in enumerate(mirrored)]
        with open(args.mirror_recipe, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"mirrored recipe: {args.mirror_recipe}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
                       "seed": args.seed, "sparsity": args.sparsity, "lambda": args.lam, "profile": profile}, f, indent=1)


if __name__ == "__main__":
    main()
