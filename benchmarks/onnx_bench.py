"""ONNX Runtime vs PyTorch eager on the same weights (issue [deploy]; docs/deploy.md, "ONNX").

SmolLM2-135M, every row in one run, one process, ``--threads`` threads for both engines:
- PyTorch eager: fp32, and lmslim RTN w8 g128 / w4 g128 (asymmetric) on lmslim's fastest int8 kernel
  (``kernel=auto``: it also rounds activations per token);
- ONNX Runtime: the exports of those same three models (``lmslim export --format onnx``: f32, and
  int8/int4 MatMulNBits carrying the lmslim models' own codes, int8 compute), plus int4 with the LM
  head quantized at export (RTN g128).
Perplexity on the first ``--max-tokens`` of builtin:wiki:test (lmslim's windows, 512/256) in each
engine. Decode tok/s: greedy, ``--gen`` tokens after an 8- and a 128-token prompt (the seeded
random prompt of ``lmslim bench``), ``--rounds`` rounds with all variants interleaved inside each
round after one warm-up round; the median per variant is reported.

Usage:
    nice .venv/bin/python benchmarks/onnx_bench.py [--out runs/onnx-bench] [--max-tokens 1024] [--rounds 5]
        [--gen 32] [--threads 2] [--no-ppl]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def torch_size_mb(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 1e6


@torch.no_grad()
def torch_decode(model, prompt: np.ndarray, gen: int) -> float:
    out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(gen):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return gen / (time.perf_counter() - t0)


def ort_decode(lm, prompt: np.ndarray, gen: int) -> float:
    from lmslim.measure.engines.onnxruntime import empty_cache

    sess = lm.session
    names = [o.name for o in sess.get_outputs()]
    past_names = [n.replace("present.", "past_key_values.", 1) for n in names[1:]]

    def step(ids, past):
        out = sess.run(names, {"input_ids": ids, **past})
        return out[0][:, -1].argmax(-1)[:, None].astype(np.int64), dict(zip(past_names, out[1:]))

    token, past = step(prompt, empty_cache(lm.meta, 1))
    t0 = time.perf_counter()
    for _ in range(gen):
        token, past = step(token, past)
    return gen / (time.perf_counter() - t0)


def build(out: Path, threads: int):
    """The variants: (name, engine, runner, size MB, perplexity callable)."""
    from lmslim.compress.quantize import DynamicInt8Config, RTNConfig, quantize_
    from lmslim.measure.engines.onnxruntime import OnnxRuntimeLM, export_size
    from lmslim.modelio import load_model
    from lmslim.modelio.export import export_model
    from lmslim.modelio.export.onnx import ONNXExportConfig

    lm = load_model("builtin:smollm2-135m")
    models = {"fp32": lm.model}
    for bits in (8, 4):
        m = copy.deepcopy(lm.model)
        quantize_(m, RTNConfig(bits=bits, group_size=128))
        models[f"w{bits} g128"] = m
    m = copy.deepcopy(lm.model)
    quantize_(m, DynamicInt8Config())  # per-channel symmetric int8: exported as blocks repeating the row's scale
    models["dyn int8"] = m
    exports = {"fp32": ("fp32", ONNXExportConfig(type="f32")),
               "w8 g128": ("w8 g128", ONNXExportConfig(type="int8")),
               "dyn int8": ("dyn int8", ONNXExportConfig(type="int8")),
               "w4 g128": ("w4 g128", ONNXExportConfig(type="int4")),
               "w4 g128 + head w4": ("w4 g128", ONNXExportConfig(type="int4", lm_head=True))}
    variants = [(name, "torch", m, torch_size_mb(m)) for name, m in models.items()]
    for name, (src, cfg) in exports.items():
        folder = out / name.replace(" ", "_").replace("+", "")
        if not folder.exists():
            t0 = time.perf_counter()
            export_model(models[src], lm.tokenizer, "onnx", folder, cfg)
            print(f"exported {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        variants.append((name, "onnxruntime", OnnxRuntimeLM(folder, threads), export_size(folder) / 1e6))
    return lm.tokenizer, variants


def main() -> None:
    from lmslim.data.spec import load_data
    from lmslim.measure.bench import BenchConfig, _prompt
    from lmslim.measure.eval import perplexity

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "onnx-bench")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ppl", action="store_true", help="decode only (perplexity does not depend on threads)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    tok, variants = build(args.out, args.threads)
    docs = load_data("builtin:wiki:test", task="clm").documents
    rows = []
    for name, engine, runner, size in variants:
        t0 = time.perf_counter()
        ppl = float("nan") if args.no_ppl else perplexity(runner, tok, docs, max_tokens=args.max_tokens)["perplexity"]
        print(f"{engine:12s} {name:18s} ppl {ppl:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append({"variant": name, "engine": engine, "size_mb": size, "perplexity": ppl, "decode": {}})
    prompts = {n: _prompt(49152, BenchConfig(prompt_len=n), torch.device("cpu")).numpy() for n in (8, 128)}
    rates = {(i, n): [] for i in range(len(variants)) for n in prompts}
    for r in range(args.rounds + 1):  # round 0 warms up every variant and is discarded
        for n, prompt in prompts.items():
            for i, (_, engine, runner, _) in enumerate(variants):
                rate = (torch_decode if engine == "torch" else ort_decode)(runner, prompt, args.gen)
                if r:
                    rates[i, n].append(rate)
        print(f"round {r} done", flush=True)
    base = rows[0]
    for i, row in enumerate(rows):
        row["decode"] = {n: statistics.median(rates[i, n]) for n in prompts}
        row["decode_all"] = {n: rates[i, n] for n in prompts}
    print(f"\n| engine | variant | size MB | ppl ({args.max_tokens} tok) | Δ ppl vs torch fp32 | decode tok/s "
          f"(8-tok prompt) | decode tok/s (128) | × torch fp32 (8 / 128) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        d, b = row["decode"], base["decode"]
        print(f"| {row['engine']} | {row['variant']} | {row['size_mb']:.0f} | {row['perplexity']:.3f} | "
              f"{row['perplexity'] / base['perplexity'] - 1:+.2%} | {d[8]:.1f} | {d[128]:.1f} | "
              f"{d[8] / b[8]:.2f} / {d[128] / b[128]:.2f} |")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
