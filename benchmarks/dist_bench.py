"""Distributed-training benchmark (issue [distributed]; BENCHMARKS.md, "Distributed").

1. **All-reduce bandwidth vs message size** between 2 (or ``--procs``) CPU processes over gloo:
   for each size, warm-up then the median time of repeated ``all_reduce`` calls; reported as
   algorithm bandwidth (bytes / time) and bus bandwidth (algbw x 2 (p - 1) / p, the bytes each rank
   actually moves in a ring all-reduce, comparable across p).
2. **Training tokens/s, 1 vs 2 processes** with ``lmslim train`` itself: the same model, data,
   sequence length and *global* batch (1 process x batch 2b with all cores vs 2 processes x batch b
   with half the cores each), plus the 2-process run with fp16 and PowerSGD gradient compression.
   tokens/s = all ranks' real tokens / training time (from train_result.json; the first steps
   include warm-up, so use enough steps).

Usage:
    flock /tmp/lmslim-heavy.lock .venv/bin/python benchmarks/dist_bench.py [--out runs/dist] \\
        [--model builtin:smollm2-135m] [--steps 12] [--batch 2] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], min_time: float, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up, also sizes the number of repeats
            dist.all_reduce(t)
        # Every rank must run the same number of collectives: rank 0's estimate decides.
        n = torch.tensor([max(5, min(1000, int(min_time / max((time.perf_counter() - t0) / 3, 1e-6))))])
        dist.broadcast(n, 0)
        times: list[float] = []
        for _ in range(int(n)):
            dist.barrier()
            t1 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t1)
        rows.append({"bytes": nbytes, "median_s": statistics.median(times), "repeats": len(times)})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def allreduce_curve(world: int, sizes: list[int], min_time: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    mp.spawn(_allreduce_worker, args=(world, port, sizes, min_time, queue), nprocs=world, join=True)
    rows = queue.get()
    for r in rows:
        r["algbw_MBps"] = r["bytes"] / r["median_s"] / 1e6
        r["busbw_MBps"] = r["algbw_MBps"] * 2 * (world - 1) / world
    return rows


def train_run(out: Path, model: str, data: str, steps: int, batch: int, seq_len: int, nproc: int | None,
              extra: list[str], tokenizer: str | None) -> dict:
    args = [sys.executable, "-m", "lmslim.cli.main", "train", model, "--data", data, "--out", str(out),
            "--max-steps", str(steps), f"batch.batch_size={batch}", f"batch.max_length={seq_len}",
            "batch.bucketing=false", "schedule.name=constant", "optim.lr=1e-5", "log.every_steps=1",
            "log.tensorboard=false", "checkpoint.keep_last=1", *extra]
    if tokenizer:
        args += ["--tokenizer", tokenizer]
    if nproc:
        args += ["--nproc", str(nproc)]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"training run failed: {' '.join(args)}\n{r.stderr[-3000:]}")
    res = json.loads((out / "train_result.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Median per-step tokens/s after the first 2 steps (warm-up), plus the whole-run figure.
    per_step = [rows[i]["tokens_seen"] - rows[i - 1]["tokens_seen"] for i in range(1, len(rows))]
    dts = [rows[i]["elapsed_s"] - rows[i - 1]["elapsed_s"] for i in range(1, len(rows))]
    steady = [t / d for t, d in zip(per_step[2:], dts[2:]) if d > 0]
    return {"tokens_per_s_run": res["tokens_per_s"], "tokens_per_s_median": statistics.median(steady) if steady
            else res["tokens_per_s"], "final_loss": res["final_loss"], "wall_s": wall,
            "comm_mb_per_step": rows[-1].get("comm_mb_per_step"), "distributed": res.get("distributed")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dist")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per all-reduce size")
    p.add_argument("--max-mb", type=int, default=256)
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data", default="builtin:wiki:train")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=2, help="per-process batch with 2 processes (1 process: 2x)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--only", default="allreduce,train")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    result: dict = {"torch": torch.__version__, "cpus": os.cpu_count()}

    if "allreduce" in parts:
        sizes = [4 ** k for k in range(5, 20) if 4 ** k <= args.max_mb * 2 ** 20]  # 1 KiB .. max
        rows = allreduce_curve(args.procs, sizes, args.min_time)
        result["allreduce"] = rows
        print(f"all-reduce, gloo, {args.procs} processes on this machine (median of repeats):")
        print("| message | median time | algbw MB/s | busbw MB/s |")
        print("|---|---|---|---|")
        for r in rows:
            size = r["bytes"]
            label = f"{size // 2 ** 20} MiB" if size >= 2 ** 20 else f"{size // 1024} KiB"
            print(f"| {label} | {r['median_s'] * 1e3:.3f} ms | {r['algbw_MBps']:,.0f} | {r['busbw_MBps']:,.0f} |")

    if "train" in parts:
        runs = {
            "1 process, batch 2b": (None, 2 * args.batch, []),
            "2 processes (DDP), batch b each": (2, args.batch, []),
            "2 processes, fp16 hook": (2, args.batch, ["distributed.comm_hook=fp16"]),
            "2 processes, PowerSGD r=4": (2, args.batch, ["distributed.comm_hook=powersgd",
                                                          "distributed.powersgd_rank=4",
                                                          "distributed.powersgd_start_step=2"]),
            "2 processes (FSDP), batch b each": (2, args.batch, ["distributed.strategy=fsdp"]),
        }
        result["train"] = {}
        for name, (nproc, batch, extra) in runs.items():
            folder = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            r = train_run(folder, args.model, args.data, args.steps, batch, args.seq_len, nproc, extra,
                          args.tokenizer)
            result["train"][name] = r
            print(f"{name}: {r['tokens_per_s_median']:,.0f} tok/s (median step), {r['tokens_per_s_run']:,.0f} "
                  f"(run), comm {r['comm_mb_per_step'] or 0:.1f} MB/step, loss {r['final_loss']:.3f}", flush=True)
        base = result["train"]["1 process, batch 2b"]["tokens_per_s_median"]
        print(f"\n{args.model}, global batch {2 * args.batch} x {args.seq_len}, {args.steps} steps, AdamW fp32:")
        print("| setting | tokens/s (median step) | × 1 process | est. MB sent per rank per step |")
        print("|---|---|---|---|")
        for name, r in result["train"].items():
            print(f"| {name} | {r['tokens_per_s_median']:,.0f} | {r['tokens_per_s_median'] / base:.2f}× | "
                  f"{r['comm_mb_per_step'] or 0:,.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
