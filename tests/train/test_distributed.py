"""Distributed training on CPU: 2 gloo processes started by ``lmslim train --nproc 2`` (torchrun's launcher).

Parity tolerance: parameters after k AdamW steps agree with the single-process reference within
``ATOL`` absolute (the all-reduce adds the two ranks' partial gradients in another order than one
big batch's matmul does, so the bits differ; the differences are float32 rounding).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmslim.cli.launch import torchrun_args, worker_argv
from lmslim.train.config import DistributedConfig
from tests.train.runs import lmslim, losses, max_diff, run_train, weights, write_corpus

ATOL = 2e-5
COMMON = ["batch.bucketing=false", "batch.max_length=32", "optim.lr=3e-3", "schedule.name=constant",
          "log.every_steps=1", "seed=7"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "text.txt")


def train(text: Path, out: Path, *extra: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    return run_train(text, out, COMMON, *extra, nproc=nproc)


# ---------------------------------------------------------------------------------------------- parity

def test_two_ranks_equal_one_process_with_double_batch(text, tmp_path):
    train(text, tmp_path / "one", "--max-steps", "4", "batch.batch_size=4")
    r = train(text, tmp_path / "two", "--max-steps", "4", "batch.batch_size=2", nproc=2)
    assert r.stdout.count("trained 4 steps") == 1  # rank 0 prints, once
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    from lmslim.assets.tiny import tiny_path

    start = weights(tiny_path("tiny-llama"))
    assert max_diff(one, start) > 1e-3  # the runs really trained
    assert max_diff(one, two) < ATOL
    # The logged loss is the global mean, the same as the single process's.
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    result = json.loads((tmp_path / "two" / "train_result.json").read_text())
    assert result["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "ddp", "comm_hook": "none"}


def test_ddp_with_gradient_accumulation_matches_one_process(text, tmp_path):
    train(text, tmp_path / "one", "--max-steps", "3", "batch.batch_size=2", "batch.grad_accum=4")
    train(text, tmp_path / "two", "--max-steps", "3", "batch.batch_size=2", "batch.grad_accum=2", nproc=2)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < ATOL


def test_fsdp_matches_one_process_and_exports_a_normal_folder(text, tmp_path):
    train(text, tmp_path / "one", "--max-steps", "4", "batch.batch_size=4")
    train(text, tmp_path / "fsdp", "--max-steps", "4", "batch.batch_size=2", "distributed.strategy=fsdp",
          "checkpoint.every_steps=2", nproc=2)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "fsdp")) < ATOL
    # The consolidated export loads as a plain model; checkpoints are sharded (one file per rank).
    from lmslim.modelio import load_model

    assert load_model(str(tmp_path / "fsdp")).model.config.num_hidden_layers == 2
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-0000004"
    assert len(list(ckpt.glob("*.distcp"))) == 2
    assert json.loads((ckpt / "meta.json").read_text())["strategy"] == "fsdp"


def test_fsdp_resume_continues_exactly(text, tmp_path):
    args = ["batch.batch_size=2", "distributed.strategy=fsdp", "checkpoint.every_steps=2"]
    train(text, tmp_path / "full", "--max-steps", "4", *args, nproc=2)
    train(text, tmp_path / "cut", "--max-steps", "2", *args, nproc=2)
    train(text, tmp_path / "cut", "--max-steps", "4", "--resume", *args, nproc=2)
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "cut")) == 0.0


def test_ranks_build_a_missing_asset_before_the_process_group(text, tmp_path, monkeypatch):
    """On a fresh $LMSLIM_HOME both ranks race to build builtin:tiny-llama. Once the process group is up,
    transformers' save_pretrained writes nothing on rank 1, so a build there used to publish a folder
    without weights (and rank 0 rebuilt it under rank 1's feet): about one launch in two failed."""
    for i in range(3):
        monkeypatch.setenv("LMSLIM_HOME", str(tmp_path / f"home{i}"))
        train(text, tmp_path / f"out{i}", "--max-steps", "1", "batch.batch_size=2", nproc=2)
        built = tmp_path / f"home{i}" / "models" / "tiny-llama"
        assert (built / "config.json").is_file() and (built / "model.safetensors").is_file()


def test_a_save_without_model_files_is_not_published(tmp_path):
    from lmslim.core.io import check_saved_model

    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(RuntimeError, match="non-zero torch.distributed ranks"):
        check_saved_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    check_saved_model(tmp_path)


@pytest.mark.parametrize("hook", ["fp16", "powersgd"])
def test_compression_hooks_train_and_send_fewer_bytes(text, tmp_path, hook):
    # Tiny buckets: several buckets in flight at once (PowerSGD's chained all-reduces once mis-ordered there).
    extra = ["distributed.powersgd_start_step=2", "distributed.powersgd_rank=2",
             "distributed.bucket_mb=0.02"] if hook == "powersgd" else []
    train(text, tmp_path / hook, "--max-steps", "12", "batch.batch_size=4", f"distributed.comm_hook={hook}",
          *extra, nproc=2)
    rows = [json.loads(x) for x in (tmp_path / hook / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.05, (first, last)
    plain = rows[0]["comm_mb_per_step"]  # powersgd: plain all-reduce before its start step
    assert rows[-1]["comm_mb_per_step"] < (plain if hook == "powersgd" else 1e9)


# ---------------------------------------------------------------------------------------------- failures

def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "lmslim.cli.main" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_rank_stops_the_job_and_resume_matches_uninterrupted(text, tmp_path):
    steps = ["--max-steps", "150", "batch.batch_size=2", "checkpoint.every_steps=5", "log.every_steps=50"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmslim.cli.main", "train", "builtin:tiny-llama", "--data", str(text), "--out",
           str(out), *COMMON, *steps, "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "step-0000010").is_dir():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        pid = _rank_pid(proc, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=90)  # no hang: the launcher stops the surviving rank
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None)
    assert err.strip().splitlines()[-1] == ("error: worker rank 1 failed (killed by SIGKILL); the other workers were "
                                            "stopped; continue from the last checkpoint with --resume")
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists()  # it did not finish
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert done and done[-1] < "step-0000150"
    train(text, out, *steps, "--resume", nproc=2)
    train(text, tmp_path / "straight", *steps, nproc=2)
    assert max_diff(weights(out), weights(tmp_path / "straight")) == 0.0


def test_bad_launch_options_fail_with_one_line(text, tmp_path):
    r = lmslim("train", "builtin:tiny-llama", "--data", str(text), "--out", str(tmp_path / "x"), "--nproc", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --nproc must be >= 1, got 0"
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        r = lmslim("train", "builtin:tiny-llama", "--data", str(text), "--out", str(tmp_path / "x"), "--nproc", "2",
                   "--master-port", str(port))
    assert r.returncode == 2 and "busy" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_resume_with_another_world_size_is_refused(text, tmp_path):
    train(text, tmp_path / "run", "--max-steps", "2", "batch.batch_size=2")
    r = lmslim("train", "builtin:tiny-llama", "--data", str(text), "--out", str(tmp_path / "run"), *COMMON,
               "--max-steps", "4", "batch.batch_size=2", "--resume", "--nproc", "2")
    assert r.returncode == 2
    assert "written by 1 process(es)" in r.stderr and "--nproc 1" in r.stderr


# ---------------------------------------------------------------------------------------------- units

def test_worker_argv_drops_launcher_options():
    argv = ["train", "m", "--nproc", "2", "--master-port=1234", "--nnodes", "1", "--out", "o", "x=1"]
    assert worker_argv(argv) == ["train", "m", "--out", "o", "x=1"]
    args = torchrun_args(argv, 2)
    assert args[:3] == ["--nproc-per-node", "2", "--standalone"] and args[-5:] == worker_argv(argv)
    multi = torchrun_args(argv, 2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400)
    assert "--node-rank" in multi and "10.0.0.1" in multi and "--standalone" not in multi


def test_comm_bytes_model():
    from lmslim.train.distributed import comm_bytes_per_step

    params = [torch.nn.Parameter(torch.zeros(256, 128)), torch.nn.Parameter(torch.zeros(256))]
    n = 256 * 128 + 256
    plain = comm_bytes_per_step(params, DistributedConfig(), 2)
    assert plain == 2 * 0.5 * n * 4  # ring all-reduce: 2 (p-1)/p of the fp32 buffer
    assert comm_bytes_per_step(params, DistributedConfig(comm_hook="fp16"), 2) == plain / 2
    psgd = DistributedConfig(comm_hook="powersgd", powersgd_rank=4, powersgd_start_step=5)
    assert comm_bytes_per_step(params, psgd, 2, step=0) == plain  # warm-up: plain all-reduce
    assert comm_bytes_per_step(params, psgd, 2, step=5) == 2 * 0.5 * ((256 + 128) * 4 + 256) * 4
    assert comm_bytes_per_step(params, DistributedConfig(strategy="fsdp"), 2) == 1.5 * plain
    assert comm_bytes_per_step(params, DistributedConfig(), 1) == 0


def test_distill_with_projection_two_ranks_match_one_process(text, tmp_path):
    """The hidden-state projection lives outside the model (not in DDP): its gradients are averaged by hand."""
    (tmp_path / "student.yaml").write_text("num_hidden_layers: 1\nhidden_size: 32\nintermediate_size: 64\n"
                                           "head_dim: 8\n")
    runs = {}
    for name, batch, nproc in (("one", 4, None), ("two", 2, 2)):
        args = ["distill", "--teacher", "builtin:tiny-llama", "--student-config", str(tmp_path / "student.yaml"),
                "--data", str(text), "--out", str(tmp_path / name), "--max-steps", "3", "--hidden-weight", "1.0",
                *COMMON, f"batch.batch_size={batch}"] + (["--nproc", str(nproc)] if nproc else [])
        r = lmslim(*args)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = tmp_path / name
    assert max_diff(weights(runs["one"]), weights(runs["two"])) < ATOL
    proj = [load_file(str(runs[n] / "checkpoints" / "step-0000003" / "extra.safetensors")) for n in ("one", "two")]
    assert list(proj[0]) == ["objective.hidden.proj.weight"]
    assert max_diff(*proj) < ATOL
    assert max_diff(proj[0], {k: torch.zeros_like(v) for k, v in proj[0].items()}) > 0  # it was trained


def test_parallel_loading_gives_the_same_batches(docs):
    from lmslim.assets.tiny import byte_tokenizer
    from lmslim.train.config import BatchConfig
    from lmslim.train.data import Batcher, tokenize

    ts = tokenize(docs, byte_tokenizer(), "clm", max_length=32)
    b = Batcher(ts, BatchConfig(batch_size=3, max_length=32), seed=1)
    plan = b.epoch(2)
    serial = list(b.batches(plan, 0))
    parallel = list(b.batches(plan, 2))
    assert len(serial) == len(parallel) == len(plan)
    for x, y in zip(serial, parallel):
        assert (x.units, x.tokens) == (y.units, y.tokens)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_training_with_loader_workers_equals_in_process_loading(docs, rt):
    from lmslim.modelio import load_model
    from lmslim.train.config import TrainConfig
    from lmslim.train.data import tokenize
    from lmslim.train.loop import train as run

    results = []
    for workers in (0, 2):
        lm = load_model("builtin:tiny-llama")
        ts = tokenize(docs, lm.tokenizer, "clm", 32)
        cfg = TrainConfig.from_dict({"max_steps": 6, "optim": {"lr": 1e-3}, "log": {"progress": False},
                                     "batch": {"batch_size": 2, "max_length": 32, "num_workers": workers}})
        results.append(run(lm.model, ts, cfg, rt).losses)
    assert results[0] == results[1]
