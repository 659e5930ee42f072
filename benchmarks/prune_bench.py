"""Pruning benchmark on SmolLM2-135M (issue [prune]; BENCHMARKS.md, "prune").

Builds each variant with ``lmslim prune`` (skipped when its folder already exists, so the script can
be re-run after an interruption), evaluates perplexity on ``builtin:wiki:test`` (before any recovery
training), and benches the dense model and every structured variant — plus one unstructured and one
2:4 model, to show they are not faster — in ONE process with interleaved rounds, so speed ratios
are measured side by side on the same machine state.

Variants: magnitude / Wanda / SparseGPT at 50% unstructured and 2:4; drop 25% / 50% of layers
(Block Influence), remove 25% / 50% of FFN neurons, 25% of attention heads (whole KV groups, ranked
across layers), and 50% of FFN neurons followed by 25% of layers.

Usage:
    flock /tmp/lmslim-heavy.lock .venv/bin/python benchmarks/prune_bench.py \\
        [--out runs/prune] [--max-tokens 8192] [--calib-samples 64] [--seq-len 512] [--rounds 2]
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
CALIBRATED = {"wanda", "sparsegpt", "heads", "neurons", "layers"}
# name -> list of `lmslim prune` steps (each a list of arguments; later steps start from the previous
# step's folder). None: the dense baseline.
VARIANTS: dict[str, list[list[str]] | None] = {
    "dense": None,
    "magnitude 50%": [["--method", "magnitude", "--sparsity", "0.5"]],
    "wanda 50%": [["--method", "wanda", "--sparsity", "0.5"]],
    "sparsegpt 50%": [["--method", "sparsegpt", "--sparsity", "0.5"]],
    "magnitude 2:4": [["--method", "magnitude", "--n-m", "2:4"]],
    "wanda 2:4": [["--method", "wanda", "--n-m", "2:4"]],
    "sparsegpt 2:4": [["--method", "sparsegpt", "--n-m", "2:4"]],
    "layers -25%": [["--method", "layers", "--fraction", "0.25"]],
    "layers -50%": [["--method", "layers", "--fraction", "0.5"]],
    "ffn neurons -25%": [["--method", "neurons", "--fraction", "0.25"]],
    "ffn neurons -50%": [["--method", "neurons", "--fraction", "0.5"]],
    "heads -25% (global)": [["--method", "heads", "--fraction", "0.25", "--scope", "global"]],
    "ffn -50% + layers -25%": [["--method", "neurons", "--fraction", "0.5"],
                               ["--method", "layers", "--fraction", "0.25"]],
}
# Unstructured variants are benched only as examples (they cannot be faster on dense kernels).
BENCHED_UNSTRUCTURED = ("magnitude 50%", "sparsegpt 2:4")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower().replace("--", "-")


def build(name: str, steps: list[list[str]], out: Path, args) -> tuple[str, list[dict]]:
    lmslim = [sys.executable, "-m", "lmslim", "prune"]
    src, reports = BASE, []
    for i, step in enumerate(steps):
        folder = out / (slug(name) + (f"-step{i}" if i < len(steps) - 1 else ""))
        if not (folder / "lmslim_prune.json").exists():
            calib = ["--calib", "builtin:wiki:train", "--calib-samples", str(args.calib_samples),
                     "--seq-len", str(args.seq_len)] if step[1] in CALIBRATED else []
            t0 = time.time()
            subprocess.run(lmslim + [src, *step, *calib, "--out", str(folder), "--overwrite"], check=True)
            print(f"[built] {name} step {i + 1}/{len(steps)} in {time.time() - t0:.0f} s", flush=True)
        reports.append(json.loads((folder / "lmslim_prune.json").read_text()))
        src = str(folder)
    return src, reports


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/prune")
    ap.add_argument("--max-tokens", type=int, default=8192, help="test tokens scored for perplexity")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved bench rounds")
    ap.add_argument("--only", nargs="*", help="subset of variant names (dense is always included)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only or v is None}

    specs, builds = {}, {}
    for name, steps in variants.items():
        if steps is None:
            specs[name] = BASE
        else:
            specs[name], builds[name] = build(name, steps, out, args)

    docs = load_data("builtin:wiki:test").documents
    results: dict[str, dict] = {name: {} for name in variants}
    for name, spec in specs.items():
        lm = load_model(spec)
        t0 = time.time()
        r = perplexity(lm.model, lm.tokenizer, docs, max_tokens=args.max_tokens)
        results[name].update(perplexity=r["perplexity"], tokens_scored=r["tokens_scored"],
                             eval_seconds=time.time() - t0, size_mb=lm.resolved.size_bytes() / 1e6,
                             params=sum(p.numel() for p in lm.model.parameters()))
        if name in builds:
            last = builds[name][-1]
            results[name].update(prune_seconds=sum(b["seconds"] for b in builds[name]),
                                 storage=last["storage"], sparsity=last.get("sparsity"),
                                 removed=last.get("removed_fraction"), dropped_layers=last.get("dropped_layers"))
        print(f"[eval] {name}: ppl {r['perplexity']:.3f}", flush=True)
        del lm

    # Interleaved bench rounds: every model once per round, so drift on a shared box hits all alike.
    benched = [n for n, steps in variants.items()
               if steps is None or n in BENCHED_UNSTRUCTURED or steps[0][1] in ("heads", "neurons", "layers")]
    models = {name: load_model(specs[name]) for name in benched}
    cfg = BenchConfig(batch=1, prompt_len=128, gen_len=64, repeats=2, warmup=1)
    rounds: dict[str, list[dict]] = {name: [] for name in benched}
    for rnd in range(args.rounds):
        for name, lm in models.items():
            rounds[name].append(bench(lm, cfg))
        print(f"[bench] round {rnd + 1}/{args.rounds} done", flush=True)
    for name, rs in rounds.items():
        results[name].update(decode_tokens_per_s=statistics.median(r["decode_tokens_per_s"] for r in rs),
                             prefill_ms_p50=statistics.median(r["prefill_ms_p50"] for r in rs),
                             notes=rs[0]["notes"])

    base = results["dense"]
    lines = ["| variant | params M | ppl | Δ ppl | decode tok/s | decode × | prefill ms | prefill × | size MB | size × |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        speed = (f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× | "
                 f"{r['prefill_ms_p50']:.0f} | {base['prefill_ms_p50'] / r['prefill_ms_p50']:.2f}×"
                 if "decode_tokens_per_s" in r else "– | – | – | –")
        lines.append(f"| {name} | {r['params'] / 1e6:.1f} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}% | {speed} | "
                     f"{r['size_mb']:.0f} | {r['size_mb'] / base['size_mb']:.2f}× |")
    table = "\n".join(lines) + "\n"

    def ppl(n):
        return results.get(n, {}).get("perplexity", float("nan"))

    targets = {}
    if all(n in results for n in ("magnitude 50%", "wanda 50%", "sparsegpt 50%")):
        targets["wanda 50% < magnitude 50% (ppl)"] = ppl("wanda 50%") < ppl("magnitude 50%")
        targets["sparsegpt 50% <= wanda 50% (ppl)"] = ppl("sparsegpt 50%") <= ppl("wanda 50%")
    combo = results.get("ffn -50% + layers -25%", {})
    if "decode_tokens_per_s" in combo:
        ratio = combo["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        targets[f"ffn -50% + layers -25% decode >= 1.6x dense (measured {ratio:.2f}x)"] = ratio >= 1.6
    meta = {"max_tokens": args.max_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "calib": {"spec": "builtin:wiki:train", "samples": args.calib_samples, "seq_len": args.seq_len},
            "bench": {"batch": 1, "prompt_len": 128, "gen_len": 64, "repeats": 2, "warmup": 1}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "targets": targets},
                                                 indent=2) + "\n")
    (out / "table.md").write_text(table)
    print(table)
    for k, v in targets.items():
        print(f"target {'MET' if v else 'NOT MET'}: {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
