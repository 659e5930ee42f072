"""GGUF in llama.cpp (issue [deploy]; BENCHMARKS.md, "GGUF export in llama.cpp").

SmolLM2-135M, every row in one run, measured in llama.cpp (llama-cpp-python):
- the released Q4_1 file (its weights define SmolLM2: Q4_1 of them is lossless, never a result);
- llama.cpp's own quantizer (``llama_cpp_quantize``) on lmslim's f32 export: Q8_0, Q4_0, Q4_K_M,
  Q3_K_M, Q2_K, and Q4_0 / Q4_K_M / Q3_K_M / Q2_K with an importance matrix (the same calibration
  statistics lmslim uses: mean squared input per column, 32×256 tokens of builtin:wiki:train);
- lmslim's exports at the same types: q8_0, q4_0, q4_k_m, q3_k_m and q2_k (the mixes give every tensor
  llama.cpp's type for that preset, its row fallbacks included: the file sizes are equal), RTN with and
  without the importance weights, and a per-tensor mix (q4_0 with attn_v/ffn_down at q8_0); ``--gptq``
  adds q4_0 GPTQ through ``lmslim export``.
``--types q3_k_m,q2_k`` measures only those types' rows (plus the released file and the f32 reference)
and writes ``results-<types>.json`` instead of ``results.json``; files already in ``--out`` are reused.
Perplexity on the first ``--max-tokens`` of builtin:wiki:test (lmslim's windows, 512/256, llama.cpp with
2 threads); decode tok/s at an 8- and a 128-token prompt, 64 greedy tokens, ``--threads`` threads,
``--rounds`` rounds with every file interleaved inside each round (median per file), each run in a
fresh process (``llama_cpp_worker.py``).

Usage:
    .venv/bin/python benchmarks/gguf_bench.py [--out runs/gguf-bench] [--max-tokens 1024] [--rounds 2]
        [--threads 1] [--gptq] [--types q3_k_m,q2_k]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gguf-bench")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gptq", action="store_true", help="add q4_0 GPTQ on the grid (lmslim export --method gptq)")
    ap.add_argument("--types", default="", help="comma-separated types to measure (e.g. q3_k_m,q2_k); default all")
    args = ap.parse_args()
    wanted = {t.strip() for t in args.types.split(",") if t.strip()}
    o = args.out
    o.mkdir(parents=True, exist_ok=True)

    import llama_cpp

    from lmslim.assets.fetch import SMOLLM2, SMOLLM2_GGUF
    from lmslim.data.calib import calibration_ids
    from lmslim.data.spec import load_data
    from lmslim.measure.bench import BenchConfig
    from lmslim.measure.engines.llama_cpp import bench_gguf, perplexity_gguf
    from lmslim.measure.engines.llama_cpp_quantize import llama_quantize
    from lmslim.modelio import load_model
    from lmslim.modelio.export import export_model
    from lmslim.modelio.export.gguf import GGUFExportConfig
    from lmslim.modelio.export.gguf_imatrix import activation_importance

    import torch

    # One PyTorch thread: on a shared 2-core machine two contending threads made the exports ~10× slower.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lm = load_model("builtin:smollm2-135m")
    ids = calibration_ids(lm.tokenizer, load_data("builtin:wiki:train", task="clm").documents, 32, 256)
    imp = activation_importance(lm.model, ids)

    def mine(name, **kw):
        path = o / f"lmslim-{name}.gguf"
        if not path.exists():
            t = time.perf_counter()
            export_model(lm.model, lm.tokenizer, "gguf", path, GGUFExportConfig(**kw))
            print(f"exported {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
        return path

    def theirs(ftype, imatrix=False):
        path = o / f"llamacpp-{ftype.lower()}{'-imatrix' if imatrix else ''}.gguf"
        if not path.exists():
            llama_quantize(f32, path, ftype, imp if imatrix else None)
        return path

    f32 = mine("f32", type="f32")
    mix = (("blk.*.attn_v.weight", "q8_0"), ("blk.*.ffn_down.weight", "q8_0"))
    # (name, type, method, how to make the file): files are made only for the selected types
    rows = [("released Q4_1 (SmolLM2's own weights)", "q4_1", "release", lambda: SMOLLM2.file(SMOLLM2_GGUF)),
            ("lmslim f32", "f32", "exact", lambda: f32),
            ("llama.cpp Q8_0", "q8_0", "llama.cpp", lambda: theirs("Q8_0")),
            ("lmslim q8_0 RTN", "q8_0", "lmslim rtn", lambda: mine("q8_0", type="q8_0")),
            ("llama.cpp Q4_0", "q4_0", "llama.cpp", lambda: theirs("Q4_0")),
            ("llama.cpp Q4_0 + imatrix", "q4_0", "llama.cpp imatrix", lambda: theirs("Q4_0", True)),
            ("lmslim q4_0 RTN", "q4_0", "lmslim rtn", lambda: mine("q4_0", type="q4_0")),
            ("lmslim q4_0 RTN + importance", "q4_0", "lmslim rtn imp",
             lambda: mine("q4_0-imp", type="q4_0", importance=imp)),
            ("lmslim q4_0 + q8_0 attn_v/ffn_down, importance", "q4_0 mix", "lmslim rtn imp",
             lambda: mine("q4_0-mix-imp", type="q4_0", tensor_types=mix, importance=imp))]
    for t, ft in (("q4_k_m", "Q4_K_M"), ("q3_k_m", "Q3_K_M"), ("q2_k", "Q2_K")):
        rows += [(f"llama.cpp {ft}", t, "llama.cpp", lambda ft=ft: theirs(ft)),
                 (f"llama.cpp {ft} + imatrix", t, "llama.cpp imatrix", lambda ft=ft: theirs(ft, True)),
                 (f"lmslim {t} RTN", t, "lmslim rtn", lambda t=t: mine(t, type=t)),
                 (f"lmslim {t} RTN + importance", t, "lmslim rtn imp",
                  lambda t=t: mine(f"{t}-imp", type=t, importance=imp))]
    rows = [(n, t, m, make()) for n, t, m, make in rows
            if not wanted or m in ("release", "exact") or t.split()[0] in wanted]
    if args.gptq:
        path = o / "lmslim-q4_0-gptq.gguf"
        if not path.exists():
            subprocess.run(LMSLIM + ["export", "builtin:smollm2-135m", "--type", "q4_0", "--method", "gptq",
                                     "--calib-samples", "32", "--seq-len", "256", "--out", str(path)], check=True)
        rows.append(("lmslim q4_0 GPTQ (15-code grid)", "q4_0", "lmslim gptq", path))
    prep_s = time.perf_counter() - t0
    del lm

    docs = load_data("builtin:wiki:test").documents
    tokenizer = load_model("builtin:smollm2-135m").tokenizer  # every file holds SmolLM2's vocabulary
    results = []
    for name, typ, method, path in rows:
        r = perplexity_gguf(path, docs, max_tokens=args.max_tokens, threads=2, tokenizer=tokenizer)
        results.append({"name": name, "type": typ, "method": method, "file": str(path),
                        "size_mb": path.stat().st_size / 1e6, "perplexity": r["perplexity"],
                        "tokens_scored": r["tokens_scored"], "decode8": [], "decode128": []})
        print(f"{name}: ppl {r['perplexity']:.3f}", flush=True)
    for _ in range(args.rounds):  # interleaved: every file once per round, both prompt lengths
        for res in results:
            for prompt in (8, 128):
                b = bench_gguf(Path(res["file"]), BenchConfig(prompt_len=prompt, gen_len=64, repeats=1, warmup=1),
                               args.threads)
                res[f"decode{prompt}"].append(b["decode_tokens_per_s"])
                res["peak_rss_mb"] = b["peak_rss_mb"]
    base = next(r for r in results if r["name"] == "lmslim f32")["perplexity"]
    rel8, rel128 = (statistics.median(results[0][k]) for k in ("decode8", "decode128"))
    lines = ["| variant | type | size MB | ppl (llama.cpp) | Δ vs f32 | tok/s @8 | tok/s @128 | @8 vs released Q4_1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        r["decode8_tokens_per_s"], r["decode128_tokens_per_s"] = (statistics.median(r[k]) for k in ("decode8", "decode128"))
        lines.append(f"| {r['name']} | {r['type']} | {r['size_mb']:.1f} | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] / base - 1:+.2%} | {r['decode8_tokens_per_s']:.1f} | "
                     f"{r['decode128_tokens_per_s']:.1f} | {r['decode8_tokens_per_s'] / rel8:.2f}× |")
    table = "\n".join(lines)
    print(table)
    (o / (f"results-{'-'.join(sorted(wanted))}.json" if wanted else "results.json")).write_text(json.dumps({"rows": results, "max_tokens": args.max_tokens,
                                                "threads_decode": args.threads, "threads_ppl": 2,
                                                "rounds": args.rounds, "prep_seconds": prep_s,
                                                "released_decode128": rel128,
                                                "llama_cpp_python": llama_cpp.__version__, "table": table},
                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
