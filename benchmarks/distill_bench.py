"""Distillation and layer-sharing benchmark (issue [distill]) on this CPU.

1. SmolLM2-135M teacher (30 layers) → 15-layer student (teacher layers 0, 2, …, 28; DistilBERT init).
   Same step budget (``--steps`` optimizer steps of ``--batch`` × ``--seq`` tokens from
   ``builtin:wiki:train``, AdamW, cosine schedule, same lr and seed) for: no training, plain
   fine-tuning (CE only), KD (α·CE + (1−α)·T²·KL), KD + hidden-state loss. Perplexity on
   ``builtin:wiki:test`` (first ``--eval-tokens`` tokens, window 512 / stride 256).
2. Sharing: SmolLM2 with groups of 2 consecutive layers sharing one set of block weights (mean init,
   per-layer norms kept), perplexity before and after the same KD budget, unique parameters and the
   saved file size. FLOPs per token do not drop (every layer still runs).
3. all-MiniLM-L6-v2 (6 layers) → 3-layer student (layers 0, 2, 4), cosine loss on mean-pooled
   embeddings, trained on wiki:train sentences; mean cosine to the teacher on held-out wiki:test sentences.
4. Decode speed side by side in one process (``decode`` row): teacher, the saved KD student, and the
   KD student with dynamic int8 on every matrix including the LM head (a combination: student +
   int8, not the student alone), plus the teacher with the same int8 for reference. One warm-up
   round, then ``--decode-repeats`` rounds that interleave the models (greedy, batch 1, KV cache,
   64-token prompt, ``--gen-len`` new tokens); the median tok/s of each model and the ratios.

5. Block-wise fit (``bw``: only the fit; ``bw-kd``: the fit, then the same KD budget as ``kd``): each
   student block re-fitted to the teacher blocks it replaces (``--bw-*`` options; wall time reported
   apart from the KD steps, so the two budgets can be compared).

Rows (``--only``, comma-separated): ``base`` (teacher and untrained-student perplexity), ``ft``,
``kd``, ``kd-hidden``, ``bw``, ``bw-kd``, ``share-kd``, ``decode``, ``minilm``. Each row is merged into the ``--json``
file, so rows can run in separate invocations (one lock hold each) and later rows reuse earlier
numbers (``decode`` loads the student the ``kd`` row saved to ``--save-dir``). Run (heavy: hold the
shared lock, one row per hold)::

    for row in base ft kd kd-hidden bw bw-kd share-kd decode; do
        flock /tmp/lmslim-heavy.lock .venv/bin/python benchmarks/distill_bench.py --only $row \
            --steps 60 --eval-tokens 2048 --json runs/distill/bench.json
    done
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmslim.compress.distill import DistillConfig, DistillObjective, every_kth, student_from_layers
from lmslim.compress.distill.run import embed_set
from lmslim.compress.quantize import quantize_
from lmslim.compress.quantize.rtn import DynamicInt8Config
from lmslim.modelio.formats.lmslim_shared import save_shared
from lmslim.compress.share import ShareConfig, share_, unique_bytes, unique_params
from lmslim.modelio import load_model
from lmslim.core.runtime import Runtime
from lmslim.data.spec import Data, load_data
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


ROWS = ("base", "ft", "kd", "kd-hidden", "bw", "bw-kd", "share-kd", "decode", "minilm")
SMOLLM = "builtin:smollm2-135m"


class Smollm:
    """The teacher, data and budget shared by the SmolLM2 rows (loaded once per invocation)."""

    def __init__(self, args):
        lm = load_model(args.teacher, "clm")
        self.lm, self.teacher, self.tok = lm, lm.model, lm.tokenizer
        self.test_docs = load_data("builtin:wiki:test", "clm").documents
        self.args = args
        self._train_set = None
        self.n_layers = lm.model.config.num_hidden_layers
        self.layers = every_kth(self.n_layers, 2, "first")

    @property
    def train_set(self):
        if self._train_set is None:
            self._train_set = tokenize(load_data("builtin:wiki:train", "clm"), self.tok, "clm",
                                       max_length=self.args.seq, pack=True)
        return self._train_set

    def cfg(self) -> TrainConfig:
        a = self.args
        return train_cfg(a, a.steps, a.batch, a.seq, a.lr)

    def ppl(self, model) -> float:
        return ppl(model, self.tok, self.test_docs, self.args)


def budget_of(args) -> str:
    return (f"{args.steps} steps x {args.batch} x {args.seq} wiki:train tokens (AdamW lr {args.lr}, cosine, "
            f"warm-up {max(1, args.steps // 10)} steps, min lr ratio 0.1, grad clip 1.0, seed 0, fp32, 2 threads)")


def row_base(sm: Smollm, rows: dict) -> None:
    rows["teacher"] = {"layers": sm.n_layers, "params": unique_params(sm.teacher), "ppl": sm.ppl(sm.teacher)}
    log(f"teacher: {rows['teacher']}")
    student = student_from_layers(sm.teacher, sm.layers)
    rows["student, no training"] = {"layers": len(sm.layers), "params": unique_params(student),
                                    "ppl": sm.ppl(student)}
    log(f"student, no training: {rows['student, no training']}")


def blockwise_fit(sm: Smollm, student, row: dict) -> None:
    """Fit the cut student's blocks to the teacher spans they replace (lmslim.compress.distill.blockwise)."""
    from lmslim.compress.distill.blockwise import BlockwiseConfig, fit_on_data

    a = sm.args
    cfg = BlockwiseConfig(epochs=a.bw_epochs, lr=a.bw_lr, samples=a.bw_samples, seq_len=a.bw_seq,
                          batch_size=a.bw_batch)
    t0 = time.perf_counter()
    rep = fit_on_data(sm.teacher, student, load_data("builtin:wiki:train", "clm"), sm.tok, cfg, sm.rt)
    row["blockwise"] = {"config": rep["config"], "rows": rep["rows"], "seconds": time.perf_counter() - t0,
                        "relative_error": [[round(b["loss_before"], 4), round(b["loss_after"], 4)]
                                           for b in rep["blocks"]]}
    row["ppl_after_blockwise"] = sm.ppl(student)
    log(f"blockwise fit: {row['blockwise']['seconds']:.0f} s, ppl {row['ppl_after_blockwise']:.1f}")


def row_student(sm: Smollm, rows: dict, name: str, dcfg: DistillConfig | None, save: Path | None = None,
                blockwise: bool = False, train: bool = True) -> None:
    student = student_from_layers(sm.teacher, sm.layers)
    row = {"layers": len(sm.layers), "params": unique_params(student), "budget": budget_of(sm.args)}
    if blockwise:
        blockwise_fit(sm, student, row)
    if not train:
        row["ppl"] = row["ppl_after_blockwise"]
        rows[name] = row
        log(f"{name}: {row}")
        return
    objective = None if dcfg is None else DistillObjective(sm.teacher, student, dcfg)
    if dcfg is not None:
        row["loss"] = {"alpha": dcfg.alpha, "temperature": dcfg.temperature, "hidden_weight": dcfg.hidden_weight,
                       "hidden_loss": dcfg.hidden_loss if dcfg.hidden_weight else None}
    row["train"] = run_train(student, sm.train_set, sm.cfg(), sm.rt, objective)
    row["ppl"] = sm.ppl(student)
    if save is not None:
        student.save_pretrained(save)  # the decode row measures this exact student
        sm.tok.save_pretrained(save)
        row["saved_to"] = str(save)
    rows[name] = row
    log(f"{name}: {row}")


def row_share(sm: Smollm, rows: dict) -> None:
    a = sm.args
    kd = DistillConfig(alpha=a.alpha, temperature=a.temperature)
    shared = copy.deepcopy(sm.teacher).requires_grad_(True)
    rep = share_(shared, ShareConfig(group_size=2, init="mean"))
    with tempfile.TemporaryDirectory() as d:
        save_shared(shared, sm.tok, Path(d))
        size = (Path(d) / "model.safetensors").stat().st_size
    row = {"layers": sm.n_layers, "group_size": 2, "init": "mean", "params_before": rep["params_before"],
           "unique_params": unique_params(shared), "unique_bytes": unique_bytes(shared),
           "file_mb": size / 1e6, "teacher_file_mb": sm.lm.resolved.size_bytes() / 1e6,
           "flops_per_token_ratio": flops_per_token(shape_of(shared), 128) / flops_per_token(shape_of(sm.teacher), 128),
           "ppl_init": sm.ppl(shared), "budget": budget_of(a),
           "loss": {"alpha": kd.alpha, "temperature": kd.temperature}}
    log(f"shared, before training: {row}")
    row["train"] = run_train(shared, sm.train_set, sm.cfg(), sm.rt, DistillObjective(sm.teacher, shared, kd))
    row["ppl"] = sm.ppl(shared)
    rows["shared groups of 2, KD recovery"] = row
    log(f"shared: {row}")


@torch.no_grad()
def decode_once(model, ids: torch.Tensor, gen_len: int) -> float:
    """Greedy decode of ``gen_len`` tokens after a prefill of ``ids`` (KV cache); tokens/s of the decode."""
    out = model(input_ids=ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    t0 = time.perf_counter()
    for _ in range(gen_len):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return gen_len / (time.perf_counter() - t0)


def row_decode(sm: Smollm, rows: dict) -> None:
    a = sm.args
    saved = a.save_dir / "kd"
    if (saved / "config.json").is_file():
        student = load_model(str(saved), "clm").model
        source = f"the KD student saved by the kd row ({saved})"
    else:  # dense fp32 speed does not depend on the weight values, but say which student it was
        student = student_from_layers(sm.teacher, sm.layers)
        source = "untrained 15-layer student (no saved KD student found)"
    int8 = DynamicInt8Config(include_lm_head=True)
    student_q = copy.deepcopy(student)
    quantize_(student_q, int8)
    teacher_q = copy.deepcopy(sm.teacher)
    quantize_(teacher_q, int8)
    models = {"teacher (fp32)": sm.teacher, "student (fp32)": student,
              "student + dynamic int8 incl. LM head": student_q, "teacher + dynamic int8 incl. LM head": teacher_q}
    for m in models.values():
        m.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(16, sm.teacher.config.vocab_size, (1, 64), generator=gen)
    for m in models.values():  # warm-up round (allocator, oneDNN primitives, int8 packing)
        decode_once(m, ids, a.gen_len)
    rates: dict[str, list[float]] = {k: [] for k in models}
    for r in range(a.decode_repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # no model always runs first
        for k in order:
            rates[k].append(decode_once(models[k], ids, a.gen_len))
    med = {k: statistics.median(v) for k, v in rates.items()}
    t = med["teacher (fp32)"]
    row = {"student": source, "prompt_len": 64, "gen_len": a.gen_len, "repeats": a.decode_repeats,
           "threads": torch.get_num_threads(), "tok_s": med, "tok_s_all": rates,
           "ratio_vs_teacher_fp32": {k: v / t for k, v in med.items()},
           "student_ppl_int8": sm.ppl(student_q), "student_ppl_fp32": sm.ppl(student)}
    rows["decode, side by side"] = row
    log(f"decode: {row}")


def smollm_part(args, rt, results: dict, todo: set[str]) -> None:
    sm = Smollm(args)
    sm.rt = rt
    rows = results.setdefault("smollm", {})
    kd = DistillConfig(alpha=args.alpha, temperature=args.temperature)
    kdh = DistillConfig(alpha=args.alpha, temperature=args.temperature, hidden_weight=args.hidden_weight,
                        hidden_loss=args.hidden_loss)
    if "base" in todo:
        row_base(sm, rows)
    if "ft" in todo:
        row_student(sm, rows, "student, fine-tuned (CE)", None)
    if "kd" in todo:
        row_student(sm, rows, "student, KD", kd, save=args.save_dir / "kd")
    if "kd-hidden" in todo:
        row_student(sm, rows, "student, KD + hidden", kdh)
    if "bw" in todo:
        row_student(sm, rows, "student, block-wise fit only", None, blockwise=True, train=False)
    if "bw-kd" in todo:
        row_student(sm, rows, "student, block-wise fit + KD", kd, blockwise=True, save=args.save_dir / "bw-kd")
    if "share-kd" in todo:
        row_share(sm, rows)
    if "decode" in todo:
        row_decode(sm, rows)


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
    ap.add_argument("--teacher", default=SMOLLM, help="teacher model (a tiny one for a smoke test)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--hidden-loss", default="cosine")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--bw-epochs", type=int, default=4, help="bw rows: block-wise fit epochs per block")
    ap.add_argument("--bw-samples", type=int, default=128, help="bw rows: calibration rows")
    ap.add_argument("--bw-seq", type=int, default=256, help="bw rows: tokens per calibration row")
    ap.add_argument("--bw-batch", type=int, default=2, help="bw rows: rows per block-wise step")
    ap.add_argument("--bw-lr", type=float, default=1e-3, help="bw rows: block-wise learning rate")
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=7)
    ap.add_argument("--minilm-steps", type=int, default=150)
    ap.add_argument("--minilm-batch", type=int, default=32)
    ap.add_argument("--minilm-lr", type=float, default=1e-4)
    ap.add_argument("--minilm-train", type=int, default=4000)
    ap.add_argument("--minilm-test", type=int, default=300)
    ap.add_argument("--only", default=",".join(ROWS),
                    help=f"comma-separated rows to run (default: all): {', '.join(ROWS)}")
    ap.add_argument("--save-dir", type=Path, default=Path("runs/distill_bench_students"),
                    help="where the kd row saves its student (the decode row loads it)")
    ap.add_argument("--json", type=Path, help="results file; rows already in it are kept and updated")
    args = ap.parse_args()
    todo = {r.strip() for r in args.only.split(",") if r.strip()}
    if todo - set(ROWS):
        ap.error(f"unknown rows {sorted(todo - set(ROWS))}; choose from {', '.join(ROWS)}")
    rt = Runtime.create(device="cpu", threads=2)
    results: dict = {}
    if args.json and args.json.is_file():
        results = json.loads(args.json.read_text())
    runs = results.setdefault("invocations", [])
    t0 = time.perf_counter()
    if "minilm" in todo:
        minilm_part(args, rt, results)
    if todo - {"minilm"}:
        smollm_part(args, rt, results, todo)
    runs.append({"args": vars(args) | {"json": str(args.json), "save_dir": str(args.save_dir)},
                 "rows": sorted(todo), "seconds": time.perf_counter() - t0, "finished": time.strftime("%F %T")})
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
