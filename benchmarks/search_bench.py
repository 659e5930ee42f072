"""lmslim search vs single techniques vs llama.cpp's own quantizations (issue [search]; BENCHMARKS.md "Search").

Takes a finished ``lmslim search`` folder (SmolLM2-135M, objective decode tok/s in llama.cpp) and measures,
side by side in one run, every file a user could ship:
- the search's re-measured front and every within-budget single-technique trial (GGUF files of the trials);
- llama.cpp's own quantizer (``llama_model_quantize``) on lmslim's f32 export: Q8_0, Q4_0, Q4_K_M, Q3_K_M,
  Q2_K, each also with an importance matrix (mean squared input per column, 32×256 tokens of wiki train);
- the released Q4_1 file and the f32 export (the reference every budget is relative to).
Perplexity in llama.cpp on the first ``--max-tokens`` of builtin:wiki:test (lmslim's 512/256 windows);
decode tok/s at a 128-token prompt, 64 greedy tokens, ``--threads`` threads, ``--rounds`` rounds with every
file once per round in a rotated order (median per file), each run in a fresh process. Then, per budget:
the fastest search variant, the fastest single technique, llama.cpp's fastest own quantization and the
released file, all within the budget on these numbers.

Usage:
    .venv/bin/python benchmarks/search_bench.py --search runs/search-smollm2 [--out runs/search-bench]
        [--budgets 3,10] [--max-tokens 8192] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _files(search: Path, out: Path) -> list[dict]:
    """Every candidate row: (name, kind, file)."""
    from lmslim.assets.fetch import SMOLLM2, SMOLLM2_GGUF
    from lmslim.data.calib import calibration_ids
    from lmslim.data.spec import load_data
    from lmslim.measure.engines.llama_cpp_quantize import llama_quantize
    from lmslim.modelio import load_model
    from lmslim.modelio.export import export_model
    from lmslim.modelio.export.gguf import GGUFExportConfig
    from lmslim.modelio.export.gguf_imatrix import activation_importance

    summary = json.loads((search / "search.json").read_text())
    rows = [{"name": "released Q4_1", "kind": "release", "file": SMOLLM2.file(SMOLLM2_GGUF)}]
    f32 = out / "lmslim-f32.gguf"
    lm = load_model("builtin:smollm2-135m")
    if not f32.exists():
        export_model(lm.model, lm.tokenizer, "gguf", f32, GGUFExportConfig(type="f32"))
    rows.append({"name": "f32 (reference)", "kind": "reference", "file": f32})
    imp = None
    for ftype in ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        for imatrix in (False, True):
            if imatrix and ftype == "Q8_0":
                continue
            path = out / f"llamacpp-{ftype.lower()}{'-imatrix' if imatrix else ''}.gguf"
            if not path.exists():
                if imatrix and imp is None:
                    ids = calibration_ids(lm.tokenizer, load_data("builtin:wiki:train", task="clm").documents, 32, 256)
                    imp = activation_importance(lm.model, ids)
                llama_quantize(f32, path, ftype, imp if imatrix else None)
            rows.append({"name": f"llama.cpp {ftype}{' + imatrix' if imatrix else ''}", "kind": "llama.cpp",
                         "file": path})
    seen = set()
    front = {r["recipe"]: r for r in summary["front"]}
    import optuna

    study = optuna.load_study(study_name="lmslim-search", storage=f"sqlite:///{(search / 'study.db').resolve()}")
    for t in study.trials:
        if t.state.name != "COMPLETE" or t.user_attrs["recipe"] in seen:
            continue
        key = t.user_attrs["recipe"]
        single = t.user_attrs.get("techniques") == ["quantize"]
        feasible = all(v <= 0 for v in t.user_attrs.get("constraints", [0]))
        if key in front or (single and feasible):
            seen.add(key)
            path = search / "trials" / key / "model.gguf"
            if path.exists():
                from lmslim.search.front import describe

                rows.append({"name": f"search #{t.number}: {describe(t)}", "kind": "search" if key in front
                             else "single", "techniques": t.user_attrs.get("techniques"), "file": path,
                             "on_front": key in front})
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--search", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "search-bench")
    ap.add_argument("--budgets", default="3,10")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import llama_cpp

    from lmslim.data.spec import load_data
    from lmslim.measure.bench import BenchConfig
    from lmslim.measure.engines.llama_cpp import bench_gguf, perplexity_gguf
    from lmslim.modelio import load_model

    t0 = time.perf_counter()
    rows, summary = _files(args.search, args.out)
    docs = load_data("builtin:wiki:test").documents
    tokenizer = load_model("builtin:smollm2-135m").tokenizer
    for r in rows:
        r["file"] = str(r["file"])
        r["size_mb"] = Path(r["file"]).stat().st_size / 1e6
        r["perplexity"] = perplexity_gguf(Path(r["file"]), docs, max_tokens=args.max_tokens, threads=2,
                                          tokenizer=tokenizer)["perplexity"]
        r["decode"] = []
        print(f"{r['name']}: ppl {r['perplexity']:.3f}", flush=True)
    for k in range(args.rounds):  # every file once per round, the order rotated each round
        for r in rows[k % len(rows):] + rows[:k % len(rows)]:
            b = bench_gguf(Path(r["file"]), BenchConfig(prompt_len=128, gen_len=64, repeats=1, warmup=1), args.threads)
            r["decode"].append(b["decode_tokens_per_s"])
    ref = next(r for r in rows if r["kind"] == "reference")["perplexity"]
    released = next(r for r in rows if r["kind"] == "release")
    for r in rows:
        r["decode_tokens_per_s"] = statistics.median(r["decode"])
        r["delta"] = r["perplexity"] / ref - 1
    rel = released["decode_tokens_per_s"]
    lines = ["| variant | size MB | ppl (llama.cpp) | Δ vs f32 | decode tok/s @128 | vs released Q4_1 |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["delta"]):
        lines.append(f"| {r['name']} | {r['size_mb']:.1f} | {r['perplexity']:.3f} | {r['delta']:+.2%} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / rel:.2f}× |")
    best = {}
    for b in (float(x) for x in args.budgets.split(",")):
        within = [r for r in rows if r["delta"] <= b / 100 and r["kind"] != "reference"]
        pick = {kind: max((r for r in within if r["kind"] in kinds), key=lambda r: r["decode_tokens_per_s"],
                          default=None)
                for kind, kinds in (("search", ("search",)), ("single technique", ("single", "search")),
                                    ("llama.cpp", ("llama.cpp",)), ("released", ("release",)))}
        if pick["single technique"] is not None and pick["single technique"].get("techniques") != ["quantize"]:
            singles = [r for r in within if r.get("techniques") == ["quantize"]]
            pick["single technique"] = max(singles, key=lambda r: r["decode_tokens_per_s"], default=None)
        best[f"+{b:g}%"] = {k: (v["name"] if v else None) for k, v in pick.items()}
        lines.append("")
        lines.append(f"Budget ppl ≤ +{b:g}%: " + "; ".join(
            f"{k}: {v['name']} {v['decode_tokens_per_s']:.1f} tok/s ({v['delta']:+.2%})" if v else f"{k}: none"
            for k, v in pick.items()))
    table = "\n".join(lines)
    print(table)
    (args.out / "results.json").write_text(json.dumps({
        "rows": rows, "best": best, "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": args.threads,
        "search_trials": summary["trials"], "search_trial_seconds": summary["trial_seconds"],
        "seconds": time.perf_counter() - t0, "llama_cpp_python": llama_cpp.__version__, "table": table},
        indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
