"""Distillation and layer-sharing benchmark (issue [distill]), in one process, on this CPU.

1. SmolLM2-135M teacher (30 layers) → 15-layer student (teacher layers 0, 2, …, 28; DistilBERT init).
   Same step budget (``--steps`` optimizer steps of ``--batch`` × ``--seq`` tokens from
   ``builtin:wiki:train``, AdamW, cosine schedule, same lr and seed) for: no training, plain
   fine-tuning (CE only), KD (α·CE + (1−α)·T²·KL), KD + hidden-state loss. Perplexity on
   ``builtin:wiki:test`` (first ``--eval-tokens`` tokens, window 512 / stride 256) and greedy decode
   tok/s (batch 1, KV cache) for teacher and student.
2. Sharing: SmolLM2 with groups of 2 consecutive layers sharing one set of block weights (mean init,
   per-layer norms kept), perplexity before and after the same KD budget, unique parameters and the
   saved file size. FLOPs per token do not drop (every layer still runs).
3. all-MiniLM-L6-v2 (6 layers) → 3-layer student (layers 0, 2, 4), cosine loss on mean-pooled
   embeddings, trained on wiki:train sentences; mean cosine to the teacher on held-out wiki:test sentences.

Run (heavy: hold the shared lock)::

    flock /tmp/lmslim-heavy.lock .venv/bin/python benchmarks/distill_bench.py --json runs/distill_bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from lmslim.compress.distill import DistillConfig, DistillObjective, every_kth, student_from_layers
from lmslim.compress.distill.run import embed_set
from lmslim.compress.share import ShareConfig, save_shared, share_, unique_bytes, unique_params
from lmslim.core.models import LoadedModel, ResolvedModel, load_model
from lmslim.core.runtime import Runtime
from lmslim.data.spec import Data, load_data
from lmslim.measure.bench import BenchConfig, bench
from lmslim.measure.cost import flops_per_token, shape_of
from lmslim.measure.eval import embed_texts, perplexity
from lmslim.train.config import BatchConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig
from lmslim.train.data import tokenize
from lmslim.train.loop import train


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_cfg(args, steps: int, batch: int, seq: int, lr: float) -> TrainConfig:
    return TrainConfig(max_steps=steps, seed=0, optim=OptimConfig(lr=lr, grad_clip=1.0),
                       schedule=ScheduleConfig(name="cosine", warmup_steps=max(1, steps // 10), min_lr_ratio=0.1),
                       batch=BatchConfig(batch_size=batch, max_length=seq),
                       log=LogConfig(every_steps=max(1, steps // 5), tensorboard=False, progress=False))


def ppl(model, tok, docs, args) -> float:
    model.eval()
    return perplexity(model, tok, docs, window=512, stride=256, max_tokens=args.eval_tokens)["perplexity"]


def decode_rate(model, tok, args) -> float:
    lm = LoadedModel(model, tok, ResolvedModel("in-memory", "memory", None), "clm")
    r = bench(lm, BenchConfig(prompt_len=64, gen_len=args.gen_len, repeats=3, warmup=1))
    return r["decode_tokens_per_s"]


def run_train(model, data, cfg, rt, objective=None) -> dict:
    t0 = time.perf_counter()
    res = train(model, data, cfg, rt, objective=objective)
    model.eval()
    return {"steps": res.steps, "final_loss": res.final_loss, "seconds": time.perf_counter() - t0,
            "tokens_per_s": res.tokens_per_s}


def sentences(docs: list[str], limit: int, min_words: int = 6) -> list[str]:
    out = []
    for d in docs:
        for s in re.split(r"(?<=[.!?])\s+", d):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s)
    return out[:limit]


def smollm_part(args, rt, results: dict) -> None:
    teacher_lm = load_model("builtin:smollm2-135m", "clm")
    teacher, tok = teacher_lm.model, teacher_lm.tokenizer
    test_docs = load_data("builtin:wiki:test", "clm").documents
    train_set = tokenize(load_data("builtin:wiki:train", "clm"), tok, "clm", max_length=args.seq, pack=True)
    cfg = train_cfg(args, args.steps, args.batch, args.seq, args.lr)
    budget = f"{args.steps} steps x {args.batch} x {args.seq} tokens (lr {args.lr}, AdamW, cosine, fp32, 2 threads)"
    results["budget"] = budget
    log(f"budget: {budget}")
    rows = results.setdefault("smollm", {})
    rows["teacher"] = {"layers": 30, "params": unique_params(teacher), "ppl": ppl(teacher, tok, test_docs, args),
                       "decode_tok_s": decode_rate(teacher, tok, args)}
    log(f"teacher: {rows['teacher']}")
    layers = every_kth(30, 2, "first")
    kd = DistillConfig(alpha=args.alpha, temperature=args.temperature)
    kdh = DistillConfig(alpha=args.alpha, temperature=args.temperature, hidden_weight=args.hidden_weight,
                        hidden_loss=args.hidden_loss)
    variants = [("student, no training", None, None), ("student, fine-tuned (CE)", "ft", None),
                ("student, KD", "kd", kd), ("student, KD + hidden", "kd", kdh)]
    for name, mode, dcfg in variants:
        if args.only and not any(o in name for o in args.only):
            continue
        student = student_from_layers(teacher, layers)
        row = {"layers": len(layers), "params": unique_params(student)}
        if mode == "ft":
            row["train"] = run_train(student, train_set, cfg, rt)
        elif mode == "kd":
            row["train"] = run_train(student, train_set, cfg, rt, DistillObjective(teacher, student, dcfg))
        row["ppl"] = ppl(student, tok, test_docs, args)
        if mode is None or name.endswith("KD"):
            row["decode_tok_s"] = decode_rate(student, tok, args)
        rows[name] = row
        log(f"{name}: {row}")
        del student

    if args.skip_share:
        return
    shared = copy.deepcopy(teacher).requires_grad_(True)  # the teacher copy was frozen by the KD objectives
    rep = share_(shared, ShareConfig(group_size=2, init="mean"))
    with tempfile.TemporaryDirectory() as d:
        save_shared(shared, tok, Path(d))
        size = (Path(d) / "model.safetensors").stat().st_size
    teacher_size = teacher_lm.resolved.size_bytes()
    row = {"layers": 30, "unique_params": unique_params(shared), "unique_bytes": unique_bytes(shared),
           "file_mb": size / 1e6, "teacher_file_mb": teacher_size / 1e6,
           "flops_per_token_ratio": flops_per_token(shape_of(shared), 128) / flops_per_token(shape_of(teacher), 128),
           "ppl_init": ppl(shared, tok, test_docs, args), "params_before": rep["params_before"]}
    row["train"] = run_train(shared, train_set, cfg, rt, DistillObjective(teacher, shared, kd))
    row["ppl"] = ppl(shared, tok, test_docs, args)
    rows["shared groups of 2, KD recovery"] = row
    log(f"shared: {row}")


def minilm_part(args, rt, results: dict) -> None:
    t = load_model("builtin:minilm-l6", "embed")
    teacher, tok = t.model, t.tokenizer
    train_s = sentences(load_data("builtin:wiki:train", "clm").documents, args.minilm_train)
    test_s = sentences(load_data("builtin:wiki:test", "clm").documents, args.minilm_test)
    student = student_from_layers(teacher, every_kth(6, 2, "first"))

    def mean_cos(model) -> float:
        a = embed_texts(model, tok, test_s, max_length=128)
        b = embed_texts(teacher, tok, test_s, max_length=128)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()

    row = {"train_sentences": len(train_s), "test_sentences": len(test_s), "teacher_params": unique_params(teacher),
           "student_params": unique_params(student), "cos_untrained": mean_cos(student)}
    ts = embed_set(Data("wiki-sentences", "embed", documents=train_s), tok, 128)
    cfg = train_cfg(args, args.minilm_steps, args.minilm_batch, 128, args.minilm_lr)
    row["train"] = run_train(student, ts, cfg, rt, DistillObjective(teacher, student, DistillConfig(task="embed")))
    row["cos_trained"] = mean_cos(student)
    results["minilm"] = row
    log(f"minilm: {row}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--hidden-loss", default="cosine")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--minilm-steps", type=int, default=150)
    ap.add_argument("--minilm-batch", type=int, default=32)
    ap.add_argument("--minilm-lr", type=float, default=1e-4)
    ap.add_argument("--minilm-train", type=int, default=4000)
    ap.add_argument("--minilm-test", type=int, default=300)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-share", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--only", nargs="*", help="SmolLM2 variants whose name contains one of these words")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rt = Runtime.create(device="cpu", threads=2)
    results: dict = {"args": vars(args) | {"json": str(args.json)}}
    t0 = time.perf_counter()
    if not args.skip_minilm:
        minilm_part(args, rt, results)
    if not args.skip_smollm:
        smollm_part(args, rt, results)
    results["seconds"] = time.perf_counter() - t0
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
