"""Per-rank memory of tensor and pipeline parallelism (issue [parallel]; BENCHMARKS.md, "Model parallelism").

For one process, tensor parallelism, pp=2, pp=2 with activation checkpointing and pp=2 x dp=2 (gloo
processes on this machine), on the same model and the same examples per step (pp x dp: half per replica).
SmolLM2-135M has 9 attention heads and 3 KV heads, so tensor parallelism over 2 ranks is refused (2 divides
neither); ``--tp`` defaults to 3 (3 processes on 2 cores).

- parameter and gradient bytes each rank holds (DTensor shards counted by their local part, parameters a
  pipeline stage does not hold live on ``meta`` and count 0; a tied weight once);
- activation bytes autograd saves for backward in one step (:func:`saved_bytes`; weights excluded);
- resident memory (RSS) of each rank after the training steps (the whole process: libraries, the full model
  loaded before it was split, allocator caches; an upper bound, not the plan's own cost);
- the median step time (forward + backward + AdamW) of each setting. Two processes share the two cores
  of this machine that one process uses alone: the ratio says what the split costs here, not a speedup.

Usage:
    flock /tmp/lmslim-heavy.lock .venv/bin/python benchmarks/parallel_bench.py \\
        [--model builtin:smollm2-135m] [--tp 3] [--batch 4] [--seq-len 256] [--steps 4] [--json OUT] \\
        [--plans tp,pp,pp-ac,pp-dp]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> dict:
    import psutil
    import torch

    from lmslim.core.runtime import Runtime
    from lmslim.data.spec import load_data
    from lmslim.modelio import load_model
    from lmslim.train import distributed as dist_
    from lmslim.train import parallel
    from lmslim.train.config import TrainConfig
    from lmslim.train.data import Batcher, tokenize
    from lmslim.train.optim import build_optimizer

    overrides, _ = plans(args)[args.plan]
    # pp x dp: each of the 2 replicas gets half the batch, so the step's examples are those of the other plans.
    rows = args.batch // 2 if args.plan == "pp-dp" else args.batch
    overrides += [f"batch.batch_size={rows}", f"batch.max_length={args.seq_len}", "batch.bucketing=false",
                  "distributed.pp_microbatches=2"]
    cfg = TrainConfig.from_dict({}, overrides)
    rt = dist_.setup(Runtime.create("cpu"), 600)
    lm = load_model(args.model)
    model = lm.model
    model.train()
    model.config.use_cache = False
    full = parallel.parameter_bytes(model)
    if cfg.precision.activation_checkpointing:
        from lmslim.train.loop import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    parallel.check_model(cfg.distributed, model.config.to_dict())
    layout = parallel.layout(rt, cfg.distributed)
    pipe = parallel.pipeline(model, layout, cfg, rt, {}, False)
    wrapped = dist_.wrap(model, rt, cfg.distributed, [], layout=layout) if args.plan == "tp" else model
    named = pipe.named_parameters() if pipe else list(model.named_parameters())
    optimizer = build_optimizer(named, cfg.optim, [model])
    data = tokenize(load_data("builtin:wiki:train", task="clm"), lm.tokenizer, "clm", args.seq_len)
    batches = iter(Batcher(data, cfg.batch, 0).batches(Batcher(data, cfg.batch, 0).epoch(0)))
    times = []
    for _ in range(args.steps):
        batch = next(batches)
        if rt.is_distributed:
            dist_.barrier(rt)
        t0 = time.perf_counter()
        with saved_bytes(named) as saved:
            if pipe:
                pipe.step([batch], batch.units)
            else:
                wrapped(**batch).loss.backward()
        optimizer.step()
        grads = sum((p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).numel() * 4
                    for _, p in named if p.grad is not None)
        optimizer.zero_grad(set_to_none=True)
        if rt.is_distributed:
            dist_.barrier(rt)
        times.append(time.perf_counter() - t0)
    return {"plan": args.plan, "rank": rt.rank, "full_param_mb": full / 1e6, "saved_act_mb": saved[0] / 1e6,
            "param_mb": parallel.parameter_bytes(model) / 1e6, "grad_mb": grads / 1e6,
            "rss_mb": psutil.Process().memory_info().rss / 1e6, "step_s_median": statistics.median(times[1:] or times),
            "threads": torch.get_num_threads()}


def plans(args: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    """Plan name -> (config overrides, processes)."""
    return {"one": ([], 1), "tp": ([f"distributed.tp={args.tp}"], args.tp), "pp": (["distributed.pp=2"], 2),
            "pp-ac": (["distributed.pp=2", "precision.activation_checkpointing=true"], 2),
            "pp-dp": (["distributed.pp=2"], 4)}


@contextlib.contextmanager
def saved_bytes(named: list):
    """Bytes of the activations autograd saves for backward in the block (weights excluded; each storage
    once). With activation checkpointing a layer's own activations are saved by the checkpoint, not here:
    what is counted is what lives outside the recomputed layers."""
    import torch

    weights = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr() for _, p in named}
    seen: set[int] = set()
    total = [0]

    def pack(t):
        local = t._local_tensor if hasattr(t, "_local_tensor") else t  # a DTensor: its own shard
        if not isinstance(local, torch.Tensor) or local.device.type == "meta":
            return t
        try:
            storage = local.untyped_storage()
            ptr = storage.data_ptr()
        except RuntimeError:  # a tensor subclass without storage of its own (counted through its parts)
            return t
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--plans", default="tp,pp,pp-ac,pp-dp", help="which plans besides one process (comma list)")
    ap.add_argument("--plan", default=None, help=argparse.SUPPRESS)  # set for the workers
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.plan is not None:  # a worker
        row = worker(args)
        Path(args.result_dir, f"{args.plan}-{row['rank']}.json").write_text(json.dumps(row))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--seq-len",
                str(args.seq_len), "--steps", str(args.steps), "--tp", str(args.tp), "--result-dir", tmp]
        ncores = os.cpu_count() or 2
        runs = [("one", base + ["--plan", "one"], {"OMP_NUM_THREADS": str(ncores)})]
        for plan, (_, n) in plans(args).items():
            if plan == "one" or plan not in args.plans.split(","):
                continue
            runs.append((plan, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                str(n), *base[1:], "--plan", plan], {"OMP_NUM_THREADS": str(max(1, ncores // n))}))
        for plan, cmd, env in runs:
            subprocess.run(cmd, check=True, env={**os.environ, **env})
        for f in sorted(Path(tmp).glob("*.json")):
            rows.append(json.loads(f.read_text()))
    one = next(r for r in rows if r["plan"] == "one")
    print("| setting | rank | parameters MB | gradients MB | saved activations MB | RSS MB | step s (median) "
          "| x 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['rank']} | {r['param_mb']:.1f} | {r['grad_mb']:.1f} | {r['saved_act_mb']:.1f} | "
              f"{r['rss_mb']:.0f} | {r['step_s_median']:.2f} | {r['step_s_median'] / one['step_s_median']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
