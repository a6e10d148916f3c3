"""Quality and speed of `llmprune prune` against the reference implementations, on one machine, in one run.

Protocol (issue "Pruning engine"): SmolLM2-135M fp32 on the CPU; calibration = NSAMPLES windows of SEQLEN
tokens sampled (seed 0, SparseGPT's sampling) from the first part of WikiText-2 valid; held-out
perplexity = NEVAL consecutive windows of SEQLEN tokens from the part calibration never sees.
Each llmprune figure is the whole `llmprune prune` command's wall time (a warm GGUF cache), measured
as a subprocess, with its peak RSS; the reference figure is the pruning time the reference harness
prints (model loading and data preparation excluded), from ../shared/anchors/reference_harness.py
running the `lib/` folder of the DSnoT paper's repository.

    python eval/bench_prune.py --text ../shared/data/wikitext2/valid.txt \
        [--reference /tmp/ref --harness ../shared/anchors/reference_harness.py] [--runs wanda:unstructured,...]
        [--llmcompressor /tmp/lcvenv/bin/python]   # llm-compressor's oneshot beside (eval/llmcompressor_run.py)
        [--seeds 0,1,2]   # every run once per calibration seed, with each cell's mean and range

Runs are METHOD:PATTERN[@SPARSITY][+two-pass][+owl][+dsnot][+w4a16|+w8a16] (quantized: GPTQ keeping the mask,
--group-size; @0 for GPTQ alone; with --llmcompressor beside its GPTQModifier, or its SparseGPT then GPTQ); `--grid wanda,sparsegpt` gives the high-sparsity
table of the README (each method at 50/60/70% × uniform/OWL × without/with DSnoT). Reference runs exist for
uniform allocation only (the harness carries no OWL); reference DSnoT leaves the MLP linears to the initial
method unless --ref-dsnot-every-linear.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("dense:-,magnitude:unstructured,wanda:unstructured,wanda:2:4,sparsegpt:unstructured,sparsegpt:2:4,"
        "wanda:unstructured+two-pass,sparsegpt:2:4+two-pass")


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import threading

    chunks = {}
    def drain(name, stream):
        chunks[name] = stream.read()
    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}\n{chunks['err'][-3000:]}")
    return seconds, usage.ru_maxrss / 1024, chunks["out"]


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    family = next((line.split(":", 1)[1].strip() for line in info if line.startswith("cpu family")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # the family and AVX-512 tell apart machines that name themselves alike ("AMD EPYC"): their matmuls round differently
    return {"cpu": cpu, "cpu_family": family, "avx512f": "avx512f" in flags, "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "git": git}


def grid(methods: str) -> list[str]:
    """The high-sparsity table's runs: method × {50, 60, 70%} × {uniform, owl} × {none, dsnot}."""
    return [f"{method}:unstructured@{level}" + extra
            for method in methods.split(",") for level in ("0.5", "0.6", "0.7")
            for extra in ("", "+dsnot", "+owl", "+owl+dsnot")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="WikiText-2 valid.txt (or any text)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", default=RUNS, help="comma-separated method:pattern")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--neval", type=int, default=64)
    ap.add_argument("--calib-fraction", type=float, default=0.6, help="leading share of the text used for calibration")
    ap.add_argument("--extra", default="", help="extra flags for llmprune prune, e.g. '--two-pass'")
    ap.add_argument("--reference", help="folder holding the DSnoT repository's lib/ (enables the reference runs)")
    ap.add_argument("--harness", default=str(Path(__file__).resolve().parents[1].parent / "shared/anchors/reference_harness.py"))
    ap.add_argument("--alps-code", metavar="ALPS_ROOT", help="a checkout of github mazumder-lab/ALPS: alps runs get "
                    "their reference from its alps.py inside the reference loop (../shared/anchors/alps_harness.py; "
                    "needs --reference too)")
    ap.add_argument("--grid", help="the high-sparsity table: comma-separated methods, e.g. wanda,sparsegpt; runs each at "
                    "50/60/70%% × {uniform, owl} × {none, dsnot} (replaces --runs)")
    ap.add_argument("--ref-dsnot-every-linear", action="store_true",
                    help="reference DSnoT on every linear (its default leaves the MLP linears to the initial method)")
    ap.add_argument("--llmcompressor", metavar="PYTHON",
                    help="the Python of an environment with llm-compressor (see eval/llmcompressor_run.py): adds its "
                         "oneshot run (sequential pipeline, the same calibration tokens) beside each uniform SparseGPT or "
                         "Wanda run without DSnoT")
    ap.add_argument("--llmcompressor-quantized-only", action="store_true",
                    help="with --llmcompressor: its runs beside the quantized runs (+w4a16, +w8a16) only")
    ap.add_argument("--seeds", default="0", help="comma-separated calibration seeds: each run is repeated for each, and "
                    "the summary gives every cell's mean and range (the reference harness samples with seed 0 only)")
    ap.add_argument("--group-size", type=int, default=64,
                    help="quantized runs (+w4a16, +w8a16): inputs per scale (SmolLM2's 576 inputs take 64, not 128)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import llmprune.models as models

    work = Path(tempfile.mkdtemp(prefix="llmprune-bench-"))
    lines = Path(args.text).read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * args.calib_fraction)
    calib, held_out = work / "calib.txt", work / "heldout.txt"
    calib.write_text("".join(lines[:cut]), encoding="utf-8")
    held_out.write_text("".join(lines[cut:]), encoding="utf-8")
    model, tokenizer, source = models.load_model(args.model)  # warms the GGUF cache, so every timed run loads the same way
    del model  # the timed children get the machine's memory to themselves
    windows = work / "calib-windows.safetensors"
    if args.llmcompressor:  # the very token windows llmprune samples, for the other tool to prune from
        from safetensors.torch import save_file

        from llmprune.data import calibration_windows

        save_file({"input_ids": calibration_windows(str(calib), tokenizer, nsamples=args.nsamples, seqlen=args.seqlen,
                                                    seed=0).contiguous()}, str(windows))
    hf_dir = str(models._gguf_cache_path(source)) if source.kind == "gguf" else source.path

    host = machine()  # before any run: the commit measured, not one made while the benchmark ran
    exe = [sys.executable, "-m", "llmprune"]
    results = []
    runs = grid(args.grid) if args.grid else args.runs.split(",")
    seeds = [int(v) for v in args.seeds.split(",")]
    if "--seed" in args.extra.split():
        raise SystemExit("pass the seeds with --seeds, not in --extra")
    for run, seed in ((run, seed) for run in runs for seed in seeds):
        run, *options = run.split("+")  # e.g. wanda:2:4+two-pass, wanda:unstructured@0.7+owl+dsnot
        run, _, level = run.partition("@")
        method, pattern = run.split(":", 1)
        unknown = set(options) - {"two-pass", "owl", "dsnot", "w4a16", "w8a16"}
        if unknown:
            raise SystemExit(f"unknown run option(s) {sorted(unknown)}; use two-pass, owl, dsnot, w4a16, w8a16")
        quantize = next((o for o in options if o in ("w4a16", "w8a16")), "none")
        schedule = "two-pass" if "two-pass" in options else ""
        sparsity = float(level) if level else 0.5
        row = {"method": method, "pattern": pattern, "sparsity_target": sparsity, "schedule": schedule or "sequential",
               "allocation": "owl" if "owl" in options else "uniform", "refine": "dsnot" if "dsnot" in options else "none",
               "quantize": quantize if quantize == "none" else f"{quantize} g{args.group_size}"}
        if method != "dense":
            row["seed"] = seed
        elif seed != seeds[0]:
            continue  # the dense model needs no calibration
        if method == "dense":
            _, _, out = run_measured([*exe, "eval", args.model, "--ppl", str(held_out), "--seqlen", str(args.seqlen),
                                      "--max-windows", str(args.neval), "--json", "--device", "cpu"])
            row["ppl"] = json.loads(out)["models"][0]["ppl"]
        else:
            out_dir = work / "-".join([method, pattern.replace(":", "of"), f"{sparsity:g}", *options, f"seed{seed}"])
            cmd = [*exe, "prune", args.model, "--method", method, "--pattern", pattern, "--calib", str(calib),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out_dir), "--json",
                   "--device", "cpu", *args.extra.split(), *(["--two-pass"] if schedule == "two-pass" else []),
                   *(["--seed", str(seed)] if len(seeds) > 1 or seed != 0 else []),
                   *(["--sparsity", str(sparsity)] if pattern == "unstructured" else []),
                   "--allocation", row["allocation"], "--refine", row["refine"],
                   *(["--quantize", quantize, "--group-size", str(args.group_size)] if quantize != "none" else [])]
            seconds, rss, out = run_measured(cmd)
            report = json.loads(out)
            _, _, out = run_measured([*exe, "eval", str(out_dir), "--ppl", str(held_out), "--seqlen", str(args.seqlen),
                                      "--max-windows", str(args.neval), "--json", "--device", "cpu"])
            refined = [r["refine"] for r in report["linears"] if r.get("refine")]
            row.update(ppl=json.loads(out)["models"][0]["ppl"], command_s=seconds, prune_s=report["timings"]["prune_s"],
                       peak_rss_mib=rss, sparsity=report["sparsity"])
            if quantize != "none":
                row["linear_bytes_ratio"] = report["sizes"]["linear_stored_bytes"] / report["sizes"]["linear_dense_bytes"]
            if refined:
                row["dsnot_rows_refined"] = sum(r["rows_refined"] for r in refined) / sum(r["rows"] for r in refined)
        if args.reference and schedule != "two-pass" and row["allocation"] == "uniform" and seed == 0 and quantize == "none":
            ref_method = "dense" if method == "dense" else ("dsnot" if row["refine"] == "dsnot" else method)
            harness = [args.harness]
            if method == "alps":  # ALPS's own solver standing where the reference loop builds its SparseGPT
                if not args.alps_code:
                    raise SystemExit("alps runs compare with ALPS's own code: pass --alps-code ALPS_ROOT")
                harness = [str(Path(args.harness).with_name("alps_harness.py")), args.alps_code]
                ref_method = "sparsegpt"
            cmd = [sys.executable, *harness, args.reference, ref_method, pattern if pattern != "-" else "unstructured",
                   "--model", hf_dir, "--calib-file", str(calib), "--eval-file", str(held_out), "--sparsity", str(sparsity),
                   "--ns", str(args.nsamples), "--seq", str(args.seqlen), "--ne", str(args.neval), "--init", method if method != "alps" else "sparsegpt",
                   *(["--skip-layer", "no_skip"] if args.ref_dsnot_every_linear else [])]
            _, rss, out = run_measured(cmd)
            ref = json.loads(out.strip().splitlines()[-1])
            row.update(ref_ppl=ref["ppl"], ref_prune_s=ref["prune_s"], ref_peak_rss_mib=rss)
        if (args.llmcompressor and method in ("sparsegpt", "wanda") and schedule != "two-pass"
                and row["allocation"] == "uniform" and row["refine"] == "none" and seed == 0
                and (quantize != "none" or not args.llmcompressor_quantized_only)):
            lc_dir = work / f"llmcompressor-{method}-{pattern.replace(':', 'of')}-{sparsity:g}-{quantize}"
            lc_method, lc_extra = method, []
            if quantize != "none":  # GPTQModifier alone at sparsity 0, else llm-compressor's SparseGPT then GPTQ
                lc_method = "gptq" if sparsity == 0 else f"{method}+gptq"
                lc_extra = ["--bits", quantize[1], "--group-size", str(args.group_size)]
            _, rss, out = run_measured([args.llmcompressor, str(Path(__file__).with_name("llmcompressor_run.py")), hf_dir,
                                        str(windows), lc_method, pattern, str(sparsity), str(lc_dir), *lc_extra])
            lc = json.loads(out.strip().splitlines()[-1])
            _, _, out = run_measured([*exe, "eval", str(lc_dir), "--ppl", str(held_out), "--seqlen", str(args.seqlen),
                                      "--max-windows", str(args.neval), "--json", "--device", "cpu"])
            row.update(lc_ppl=json.loads(out)["models"][0]["ppl"], lc_prune_s=lc["prune_s"], lc_peak_rss_mib=rss,
                       lc_sparsity=lc.get("sparsity"), lc_version=lc["llmcompressor"])
        results.append(row)
        print(json.dumps(row), flush=True)

    info = {"machine": host, "protocol": {k: getattr(args, k) for k in ("nsamples", "seqlen", "neval", "calib_fraction", "extra")},
            "results": results}
    print()
    print(f"machine: {info['machine']}")
    print(f"{'method':<10} {'pattern':<13} {'target':>6} {'alloc':<7} {'refine':<6} {'schedule':<10} {'quant':<10} {'ppl':>9} {'ref ppl':>9} "
          f"{'Δppl':>7} {'cmd s':>7} {'prune s':>8} {'ref s':>7} {'ratio':>6} {'RSS MiB':>8}")
    for r in results:
        ref_ppl, ref_s = r.get("ref_ppl"), r.get("ref_prune_s")
        delta = f"{(r['ppl'] / ref_ppl - 1) * 100:+.1f}%" if ref_ppl else ""
        ratio = f"{r['command_s'] / ref_s:.2f}" if ref_s and "command_s" in r else ""
        print(f"{r['method']:<10} {r['pattern']:<13} {r['sparsity_target']:>6g} {r['allocation']:<7} {r['refine']:<6} "
              f"{r['schedule']:<10} {r.get('quantize', 'none'):<10} {r['ppl']:>9.2f} {ref_ppl or '':>9} {delta:>7} "
              f"{r.get('command_s', 0):>7.1f} {r.get('prune_s', 0):>8.1f} {ref_s or '':>7} {ratio:>6} {r.get('peak_rss_mib', 0):>8.0f}")
        if "lc_ppl" in r:
            print(f"{'':<10} llm-compressor {r['lc_version']}: ppl {r['lc_ppl']:.2f} ({(r['ppl'] / r['lc_ppl'] - 1) * 100:+.1f}% ours), "
                  f"prune {r['lc_prune_s']:.1f} s (ours, whole command / its prune: {r['command_s'] / r['lc_prune_s']:.2f}), "
                  f"RSS {r['lc_peak_rss_mib']:.0f} MiB")
    if len(seeds) > 1:
        print(f"\nover seeds {args.seeds}: mean perplexity (lowest-highest)")
        cells: dict[tuple, list[float]] = {}
        for r in results:
            if "seed" in r:
                key = (r["method"], r["pattern"], r["sparsity_target"], r["allocation"], r["refine"], r["schedule"],
                       r.get("quantize", "none"))
                cells.setdefault(key, []).append(r["ppl"])
        for key, ppls in cells.items():
            print(f"{key[0]:<10} {key[1]:<13} {key[2]:>6g} {key[3]:<7} {key[4]:<6} {key[5]:<10} {key[6]:<10} "
                  f"{sum(ppls) / len(ppls):>9.2f} ({min(ppls):.2f}-{max(ppls):.2f}, {len(ppls)} seeds)")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
