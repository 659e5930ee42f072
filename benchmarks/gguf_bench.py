"""GGUF in llama.cpp (issue [deploy]; BENCHMARKS.md, "GGUF export in llama.cpp").

SmolLM2-135M, every row in one run, measured in llama.cpp (llama-cpp-python):
- the released Q4_1 file (its weights define SmolLM2: Q4_1 of them is lossless, never a result);
- lmslim's exports: f32, f16, q8_0 (RTN), q4_0 (RTN; with ``--clip``/``--gptq`` also RTN + clip search
  and GPTQ on the q4_0 grid);
- llama.cpp's own quantization (``llama_model_quantize``, no importance matrix) of lmslim's f32
  export: Q8_0, Q4_0, Q4_K_M: the same-type comparison.
Perplexity on the first ``--max-tokens`` of builtin:wiki:test (lmslim's windows, 512/256); decode
tok/s at an 8-token prompt, 64 greedy tokens, ``--rounds`` rounds with the files interleaved inside
each round (median per file), each run in a fresh process (``llama_cpp_worker.py``).

Usage:
    .venv/bin/python benchmarks/gguf_bench.py [--out runs/gguf-bench] [--max-tokens 1024] [--rounds 3]
        [--threads 1] [--clip] [--gptq]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LMSLIM = [sys.executable, "-m", "lmslim"]


def export(out: Path, typ: str, *extra: str) -> Path:
    if not out.exists():
        subprocess.run(LMSLIM + ["export", "builtin:smollm2-135m", "--type", typ, "--out", str(out), *extra],
                       check=True)
    return out


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize {ftype} failed ({rc})")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gguf-bench")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clip", action="store_true", help="add q4_0 RTN with the clipping search")
    ap.add_argument("--gptq", action="store_true", help="add q4_0 GPTQ (+ clip search) on the q4_0 grid")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from lmslim.assets.fetch import SMOLLM2, SMOLLM2_GGUF
    from lmslim.data.spec import load_data
    from lmslim.measure.bench import BenchConfig
    from lmslim.measure.engines.llama_cpp import bench_gguf, perplexity_gguf
    from lmslim.modelio import load_model

    o = args.out
    t0 = time.perf_counter()
    f32 = export(o / "lmslim-f32.gguf", "f32")
    rows = [("released Q4_1 (SmolLM2's own weights)", "Q4_1", "release", SMOLLM2.file(SMOLLM2_GGUF)),
            ("lmslim f32", "f32", "exact", f32),
            ("lmslim f16", "f16", "cast", export(o / "lmslim-f16.gguf", "f16")),
            ("llama.cpp Q8_0", "q8_0", "llama.cpp", llama_quantize(f32, o / "llamacpp-q8_0.gguf", "Q8_0")),
            ("lmslim q8_0 RTN", "q8_0", "lmslim rtn", export(o / "lmslim-q8_0.gguf", "q8_0")),
            ("llama.cpp Q4_0", "q4_0", "llama.cpp", llama_quantize(f32, o / "llamacpp-q4_0.gguf", "Q4_0")),
            ("lmslim q4_0 RTN", "q4_0", "lmslim rtn", export(o / "lmslim-q4_0.gguf", "q4_0"))]
    if args.clip:  # the range search is slow on 2 busy cores (minutes)
        rows.append(("lmslim q4_0 RTN + clip", "q4_0", "lmslim rtn+clip",
                     export(o / "lmslim-q4_0-clip.gguf", "q4_0", "--clip-search")))
    if args.gptq:
        rows.append(("lmslim q4_0 GPTQ + clip", "q4_0", "lmslim gptq",
                     export(o / "lmslim-q4_0-gptq.gguf", "q4_0", "--method", "gptq", "--clip-search",
                            "--calib-samples", "32", "--seq-len", "256")))
    rows.append(("llama.cpp Q4_K_M", "q4_k_m", "llama.cpp", llama_quantize(f32, o / "llamacpp-q4_k_m.gguf", "Q4_K_M")))
    prep_s = time.perf_counter() - t0

    docs = load_data("builtin:wiki:test").documents
    # Every file holds SmolLM2's vocabulary: one tokenizer (lmslim's copy) gives the ids for all of them.
    tokenizer = load_model("builtin:smollm2-135m").tokenizer
    results = []
    for name, typ, method, path in rows:
        r = perplexity_gguf(path, docs, max_tokens=args.max_tokens, threads=2, tokenizer=tokenizer)
        results.append({"name": name, "type": typ, "method": method, "file": str(path),
                        "size_mb": path.stat().st_size / 1e6, "perplexity": r["perplexity"],
                        "tokens_scored": r["tokens_scored"], "decode": []})
        print(f"{name}: ppl {r['perplexity']:.3f}", flush=True)
    cfg = BenchConfig(prompt_len=8, gen_len=64, repeats=1, warmup=1)
    for _ in range(args.rounds):  # interleaved: every file once per round
        for res in results:
            b = bench_gguf(Path(res["file"]), cfg, args.threads)
            res["decode"].append(b["decode_tokens_per_s"])
            res["peak_rss_mb"] = b["peak_rss_mb"]
    base = next(r for r in results if r["name"] == "lmslim f32")["perplexity"]
    release = statistics.median(results[0]["decode"])
    lines = ["| variant | type | size MB | ppl (llama.cpp) | Δ vs f32 | decode tok/s | vs released Q4_1 | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = statistics.median(r["decode"])
        r["decode_tokens_per_s"] = tps
        lines.append(f"| {r['name']} | {r['type']} | {r['size_mb']:.1f} | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] / base - 1:+.2%} | {tps:.1f} | {tps / release:.2f}× | {r['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    import llama_cpp

    (o / "results.json").write_text(json.dumps({"rows": results, "max_tokens": args.max_tokens,
                                                "threads_decode": args.threads, "rounds": args.rounds,
                                                "prep_seconds": prep_s, "llama_cpp_python": llama_cpp.__version__,
                                                "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
