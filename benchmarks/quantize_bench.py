"""Quantization benchmark on SmolLM2-135M (BENCHMARKS.md, "quantize").

Builds each variant with ``lmslim quantize`` (skipped when its folder already exists, so the script
can be re-run after an interruption), evaluates perplexity on ``builtin:wiki:test`` and benches all
variants in ONE process with interleaved rounds, so speed ratios are measured side by side.

Usage:
    .venv/bin/python benchmarks/quantize_bench.py [--out runs/quantize] [--max-tokens 16384] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmslim.modelio import load_model
from lmslim.data.spec import load_data
from lmslim.measure.bench import BenchConfig, bench
from lmslim.measure.eval import perplexity

BASE = "builtin:smollm2-135m"
# name -> lmslim quantize arguments (None: the fp32 baseline itself)
VARIANTS: dict[str, list[str] | None] = {
    "fp32": None,
    "dynamic-int8": ["--method", "dynamic-int8"],
    "dynamic-int8+head": ["--method", "dynamic-int8", "--include-lm-head"],
    "w8-rtn (weight-only, dequant kernel)": ["--method", "rtn", "--bits", "8", "--kernel", "dequant"],
    "w4-g128-rtn (int8 kernel)": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "w4-g128-rtn (dequant kernel)": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--kernel", "dequant"],
    "w4-g128-gptq (int8 kernel)": ["--method", "gptq", "--bits", "4", "--group-size", "128",
                                   "--calib", "builtin:wiki:train", "--calib-samples", "128", "--seq-len", "512"],
    "w4-g128-gptq+awq+clip (int8 kernel)": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--awq",
                                            "--clip-search", "--calib", "builtin:wiki:train",
                                            "--calib-samples", "128", "--seq-len", "512"],
    "w4-g128-awq (int8 kernel)": ["--method", "awq", "--bits", "4", "--group-size", "128",
                                  "--calib", "builtin:wiki:train", "--calib-samples", "128", "--seq-len", "512"],
    "smoothquant a=0.5": ["--method", "smoothquant", "--alpha", "0.5", "--calib", "builtin:wiki:train",
                          "--calib-samples", "128", "--seq-len", "512"],
    "w4-g32-rtn asym minmax [LOSSLESS ON THIS MODEL: its release grid]": ["--method", "rtn", "--bits", "4",
                                                                           "--group-size", "32", "--asymmetric",
                                                                           "--minmax"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" [")[0]).strip("-").lower()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/quantize")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="subset of variant names")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    lmslim = [sys.executable, "-m", "lmslim"]

    specs, build = {}, {}
    for name, qargs in variants.items():
        if qargs is None:
            specs[name] = BASE
            continue
        folder = out / slug(name)
        if not (folder / "lmslim_quantize.json").exists():
            t0 = time.time()
            subprocess.run(lmslim + ["quantize", BASE, *qargs, "--out", str(folder), "--overwrite"], check=True)
            print(f"[built] {name} in {time.time() - t0:.0f} s", flush=True)
        build[name] = json.loads((folder / "lmslim_quantize.json").read_text())
        specs[name] = str(folder)

    docs = load_data("builtin:wiki:test").documents
    results: dict[str, dict] = {name: {} for name in variants}
    for name, spec in specs.items():
        lm = load_model(spec)
        t0 = time.time()
        r = perplexity(lm.model, lm.tokenizer, docs, max_tokens=args.max_tokens)
        results[name].update(perplexity=r["perplexity"], tokens_scored=r["tokens_scored"],
                             eval_seconds=time.time() - t0, size_mb=lm.resolved.size_bytes() / 1e6)
        print(f"[eval] {name}: ppl {r['perplexity']:.3f}", flush=True)
        del lm

    # Interleaved bench rounds: every variant once per round, so drift on a shared box hits all alike.
    models = {name: load_model(spec) for name, spec in specs.items()}
    cfg = BenchConfig(batch=1, prompt_len=128, gen_len=64, repeats=2, warmup=1)
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name, lm in models.items():
            rounds[name].append(bench(lm, cfg))
        print(f"[bench] round {rnd + 1}/{args.rounds} done", flush=True)
    for name, rs in rounds.items():
        results[name].update(
            decode_tokens_per_s=statistics.median(r["decode_tokens_per_s"] for r in rs),
            prefill_ms_p50=statistics.median(r["prefill_ms_p50"] for r in rs),
            bytes_read_per_token=rs[0]["bytes_read_per_token"],
            fraction_of_bound=statistics.median(r["fraction_of_bound"] for r in rs),
        )
        if name in build:
            results[name].update(quantize_seconds=build[name]["seconds"], quantize_peak_rss_mb=build[name]["peak_rss_mb"])
    base = results["fp32"] if "fp32" in results else next(iter(results.values()))
    lines = ["| variant | ppl | Δ ppl | decode tok/s | decode × | prefill ms | prefill × | size MB | size × |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}% | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× | "
                     f"{r['prefill_ms_p50']:.0f} | {base['prefill_ms_p50'] / r['prefill_ms_p50']:.2f}× | "
                     f"{r['size_mb']:.0f} | {r['size_mb'] / base['size_mb']:.2f}× |")
    table = "\n".join(lines) + "\n"
    meta = {"max_tokens": args.max_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "bench": {"batch": 1, "prompt_len": 128, "gen_len": 64, "repeats": 2, "warmup": 1}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
