"""Training-engine benchmark (issue [train]; BENCHMARKS.md, "train").

In ONE run, on the same machine state:

1. **Throughput vs Hugging Face ``Trainer``**: same model, same rows (wiki text packed into
   fixed-length rows), same batch size and sequence length, AdamW, constant lr, gradient clipping at
   1.0, fp32. Models: SmolLM2-135M and a small Llama config. Three settings, each run in a FRESH
   process (lmslim's allocator setting is process-wide) from the same starting weights, in rotating
   order: lmslim with its defaults, lmslim's plain loop (``host_memory=release optim.fused=false``, to
   show what those two settings give) and ``Trainer`` with its own defaults (for torch >= 2.8 that is
   fused AdamW). Each run's first ``--warmup`` steps are dropped; tokens/s is the median over the
   remaining step intervals (wall time between consecutive step ends, so data loading and the
   optimizer step count for both).
2. **Peak memory with vs without activation checkpointing** (SmolLM2-135M), under both
   ``host_memory`` settings (``reuse`` keeps freed buffers, so it costs resident memory): each setting
   runs in a fresh subprocess (peak RSS cannot be reset inside a process); reported as peak RSS and as
   the increase over the RSS just before the first training step (weights + data loaded).
3. **Bucketed vs fixed-length padding** on variable-length text (wiki paragraphs, no packing,
   small Llama): our loop with length bucketing + dynamic padding + a token budget vs rows padded to
   ``max_length`` in random order. Both report real (non-padding) tokens/s and the padding share.

Usage:
    flock /tmp/lmslim-heavy.lock .venv/bin/python benchmarks/train_bench.py \\
        [--out runs/train] [--steps 8] [--warmup 3] [--repeats 2] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOL = "builtin:smollm2-135m"
# A small Llama (~20M parameters, mostly the 49k-token embedding shared with SmolLM2's tokenizer).
SMALL_LLAMA = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True}


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _models(base: str = SMOL):
    """name -> (fresh model factory, tokenizer); ``base`` = builtin:tiny-llama only to smoke-test this script."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmslim.modelio import load_model

    lm = load_model(base, "clm")
    state = copy.deepcopy(lm.model.state_dict())
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def smol():
        m = load_model(base, "clm").model
        m.load_state_dict(state)
        return m

    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **SMALL_LLAMA)
    torch.manual_seed(0)
    small_state = LlamaForCausalLM(cfg).state_dict()

    def small():
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(small_state)
        return m

    return {base.removeprefix("builtin:"): smol, "small-llama": small}, tok


def _rows(tok, seq_len: int, n: int) -> list[list[int]]:
    """``n`` rows of exactly ``seq_len`` tokens of wiki text (packed documents)."""
    from lmslim.data.spec import load_data
    from lmslim.train.data import tokenize

    docs = load_data("builtin:wiki:train", task="clm")
    ts = tokenize(docs, tok, "clm", max_length=seq_len, pack=True)
    rows = [e["input_ids"] for e in ts.examples if len(e["input_ids"]) == seq_len][:n]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} full rows of {seq_len} tokens in builtin:wiki:train")
    return rows


def _ours(model, rows, tok, batch: int, seq_len: int, steps: int, **cfg_over) -> list[float]:
    """Step-end timestamps of our loop over ``rows``."""
    from lmslim.core.runtime import Runtime
    from lmslim.train.config import TrainConfig
    from lmslim.train.data import TokenizedSet
    from lmslim.train.loop import train

    ts = TokenizedSet("clm", [{"input_ids": r} for r in rows], tok.pad_token_id, tok)
    cfg = TrainConfig.from_dict({"max_steps": steps, "optim": {"name": "adamw", "lr": 1e-4, "grad_clip": 1.0},
                                 "schedule": {"name": "constant"}, "precision": {"mode": "fp32"},
                                 "batch": {"batch_size": batch, "max_length": seq_len},
                                 "log": {"every_steps": 10 ** 6, "progress": False, "tensorboard": False}},
                                [f"{k}={v}" for k, v in cfg_over.items()])
    stamps = [time.perf_counter()]
    train(model, ts, cfg, Runtime.create("cpu"), callbacks=[lambda s, r: stamps.append(time.perf_counter())])
    return stamps


def _hf(model, rows, batch: int, steps: int, optim: str | None = None) -> tuple[list[float], str]:
    """Step-end timestamps of transformers.Trainer over the same rows (its default optimizer unless ``optim``),
    and the name of the optimizer it used."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    data = [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(len(r), dtype=torch.long),
             "labels": torch.tensor(r)} for r in rows]
    stamps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        extra = {"optim": optim} if optim else {}
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                 max_grad_norm=1.0, logging_steps=10 ** 6, save_strategy="no",
                                 report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                                 **extra)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          callbacks=[Clock()])
        trainer.train()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
        name = type(opt).__name__ + (" fused" if opt.defaults.get("fused") else "")
    return stamps, name


def _tps(stamps: list[float], warmup: int, tokens_per_step: int) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return tokens_per_step / statistics.median(gaps)


# The settings compared, each run in a fresh process: lmslim's allocator setting (host_memory) is
# process-wide, so running the contenders in one process would hand it to whoever runs second.
SETTINGS = {
    "lmslim": {},
    "lmslim, plain loop (host_memory=release, optim.fused=false)": {"host_memory": "release", "optim.fused": "false"},
    "HF Trainer (defaults)": None,
}


def throughput_child(args, model_name: str, setting: str) -> dict:
    """Runs in a subprocess: tokens/s of one setting on one model."""
    factories, tok = _models(args.base)
    rows = _rows(tok, args.seq_len, args.batch * args.steps)
    over = SETTINGS[setting]
    model = factories[model_name]()
    if over is None:
        stamps, optim = _hf(model, rows, args.batch, args.steps)
    else:
        stamps = _ours(model, rows, tok, args.batch, args.seq_len, args.steps, **over)
        optim = "AdamW fused" if over.get("optim.fused") != "false" else "AdamW"
    return {"tokens_per_s": _tps(stamps, args.warmup, args.batch * args.seq_len), "optimizer": optim}


def throughput(args, factories, tok) -> dict:
    out = {}
    for name in factories:
        res = {s: [] for s in SETTINGS}
        optims = {}
        for r in range(args.repeats):
            # Rotate who goes first, so a slow start or a neighbour's burst does not favour one side.
            order = list(SETTINGS)
            order = order[r % len(order):] + order[:r % len(order)]
            for setting in order:
                cmd = [sys.executable, __file__, "--_throughput-child", name, setting, "--base", args.base,
                       "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                child = json.loads(line)
                res[setting].append(child["tokens_per_s"])
                optims[setting] = child["optimizer"]
            print(f"  {name} round {r + 1}: " + ", ".join(f"{s} {res[s][-1]:.0f}" for s in SETTINGS) + " tok/s",
                  flush=True)
        hf = statistics.median(res["HF Trainer (defaults)"])
        out[name] = {"tokens_per_s": res, "optimizer": optims,
                     "ratio_to_hf_median": {s: statistics.median(v) / hf for s, v in res.items()}}
    return out


def memory_child(ckpt: bool, batch: int, seq_len: int, steps: int, base: str, host_memory: str = "reuse") -> dict:
    """Runs in a subprocess: peak RSS of training ``base`` with/without activation checkpointing."""
    import psutil

    from lmslim.measure.bench import peak_rss_mb

    factories, tok = _models(base)
    model = factories[base.removeprefix("builtin:")]()
    rows = _rows(tok, seq_len, batch * steps)
    before = psutil.Process().memory_info().rss / 2 ** 20
    stamps = _ours(model, rows, tok, batch, seq_len, steps, **{"precision.activation_checkpointing": str(ckpt).lower(),
                                                               "host_memory": host_memory})
    return {"activation_checkpointing": ckpt, "host_memory": host_memory, "rss_before_train_mb": before,
            "peak_rss_mb": peak_rss_mb(),
            "step_s": statistics.median([b - a for a, b in zip(stamps, stamps[1:])][1:] or [stamps[-1] - stamps[0]])}


def memory(args) -> list[dict]:
    """Peak RSS with activation checkpointing off/on, under both host_memory settings (fresh process each)."""
    res = []
    for host in ("reuse", "release"):
        for ckpt in (False, True, False, True)[:2 * min(args.repeats, 2)]:
            cmd = [sys.executable, __file__, "--_memory-child", "1" if ckpt else "0", "--batch", str(args.batch),
                   "--seq-len", str(args.mem_seq_len), "--steps", str(args.mem_steps), "--base", args.base,
                   "--host-memory", host]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(line)
            r["increase_mb"] = r["peak_rss_mb"] - r["rss_before_train_mb"]
            print(f"  host_memory {host}, activation checkpointing {ckpt}: peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(+{r['increase_mb']:.0f} MB over weights+data), step {r['step_s']:.2f} s", flush=True)
            res.append(r)
    return res


def bucketing(args, factories, tok) -> dict:
    """Real tokens/s with length bucketing + dynamic padding vs fixed-length padding (small Llama)."""
    from lmslim.core.runtime import Runtime
    from lmslim.data.spec import Data, load_data
    from lmslim.train.config import TrainConfig
    from lmslim.train.data import Batcher, tokenize
    from lmslim.train.loop import train

    docs = load_data("builtin:wiki:train", task="clm").documents
    paras = [p for d in docs for p in d.split("\n") if len(p.split()) >= 5][:4000]
    ts = tokenize(Data("wiki paragraphs", "clm", documents=paras), tok, "clm", max_length=args.var_len, pack=False)
    settings = {
        "bucketed (dynamic padding, token budget)": {"batch.bucketing": "true", "batch.padding": "dynamic",
                                                     "batch.token_budget": args.batch * args.var_len},
        "fixed length (pad to max_length)": {"batch.bucketing": "false", "batch.padding": "max_length",
                                             "batch.batch_size": args.batch},
    }
    out = {name: {"real_tokens_per_s": [], "padding_share": None} for name in settings}
    for r in range(args.repeats):
        for name, over in settings.items():
            cfg = TrainConfig.from_dict({"max_steps": args.var_steps, "optim": {"lr": 1e-4}, "schedule": {"name": "constant"},
                                         "precision": {"mode": "fp32"}, "batch": {"max_length": args.var_len},
                                         "log": {"every_steps": 10 ** 6, "progress": False, "tensorboard": False}},
                                        [f"{k}={v}" for k, v in over.items()])
            if out[name]["padding_share"] is None:
                b = Batcher(ts, cfg.batch, seed=0)
                plan = b.epoch(0)
                real = sum(ts.lengths[i] for batch in plan for i in batch)
                padded = sum(len(batch) * (max(ts.lengths[i] for i in batch) if cfg.batch.padding == "dynamic"
                                           else cfg.batch.max_length) for batch in plan)
                out[name]["padding_share"] = 1 - real / padded
                out[name]["rows_per_batch_mean"] = statistics.mean(len(x) for x in plan)
            res = train(factories["small-llama"](), ts, cfg, Runtime.create("cpu"))
            out[name]["real_tokens_per_s"].append(res.tokens_per_s)
            print(f"  {name} round {r + 1}: {res.tokens_per_s:.0f} real tok/s "
                  f"(padding {out[name]['padding_share']:.0%})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--base", default=SMOL, help="real model to compare on (builtin:tiny-llama: smoke test only)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--mem-seq-len", type=int, default=256)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--host-memory", default="reuse", help=argparse.SUPPRESS)
    p.add_argument("--var-len", type=int, default=256)
    p.add_argument("--var-steps", type=int, default=12)
    p.add_argument("--only", default="throughput,memory,bucketing")
    p.add_argument("--_memory-child", dest="memory_child", default=None)
    p.add_argument("--_throughput-child", dest="throughput_child", nargs=2, default=None)
    args = p.parse_args()
    _quiet()
    if args.throughput_child is not None:
        print(json.dumps(throughput_child(args, *args.throughput_child)))
        return
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child == "1", args.batch, args.seq_len, args.steps, args.base,
                                      args.host_memory)))
        return
    parts = args.only.split(",")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    import transformers

    result["transformers"] = transformers.__version__
    t0 = time.time()
    factories, tok = _models(args.base)
    if "throughput" in parts:
        print("throughput: lmslim train vs transformers.Trainer", flush=True)
        result["throughput"] = throughput(args, factories, tok)
    if "memory" in parts:
        print(f"peak memory: activation checkpointing off/on ({args.base})", flush=True)
        result["memory"] = memory(args)
    if "bucketing" in parts:
        print("padding: bucketed vs fixed length (small Llama, wiki paragraphs)", flush=True)
        result["bucketing"] = bucketing(args, factories, tok)
    result["wall_s"] = time.time() - t0
    result["load_average_end"] = os.getloadavg()  # other jobs on the machine make tokens/s noisy
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "train_bench.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
