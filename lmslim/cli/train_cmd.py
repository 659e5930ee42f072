"""``lmslim train``: fine-tune, continue pretraining or train from a config (see docs/train.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import DeviceOpt, ThreadsOpt, TrustOpt, app, hold, out
from lmslim.cli.launch import MasterAddrOpt, MasterPortOpt, NnodesOpt, NodeRankOpt, NprocOpt
from lmslim.core.errors import UserError

TRAIN_TASKS = ("clm", "seq-cls", "token-cls")


# What a run leaves in --out before its first checkpoint: nothing worth keeping, nothing to resume.
_START_FILES = {"train_config.json", "metrics.jsonl", "tensorboard", "lmslim_distill.json"}


def _temporary(name: str) -> bool:
    # what a killed write leaves (lmslim.core.io: .NAME.XXXX.tmp, .NAME.XXXX.partial, .NAME.old): nothing to keep
    return name.startswith(".") and name.endswith((".tmp", ".partial", ".old"))


def _killed_before_first_checkpoint(path: Path) -> bool:
    """--out holds only what a run writes before its first checkpoint (it was stopped before one)."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir() if not _temporary(p.name)}
    ckpts = path / "checkpoints"
    if "checkpoints" in names and ckpts.is_dir() and not any(p for p in ckpts.iterdir() if not _temporary(p.name)):
        names.discard("checkpoints")  # created, but no checkpoint was completed
    return names <= _START_FILES  # (an empty set: only temporaries, or nothing at all)


@contextlib.contextmanager
def remove_unfinished_start(out_dir: Path):
    """On failure, remove ``out_dir`` if this run created it and it holds no checkpoint yet.

    A run that fails (a full disk, a diverged loss) before its first checkpoint has nothing to resume;
    what it wrote (metrics, the config) would only block the next run.
    """
    existed = out_dir.exists()
    try:
        yield
    except BaseException:
        if not existed and _killed_before_first_checkpoint(out_dir) and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def check_out_dir(path: Path, resume: bool, overwrite: bool, inputs: list = ()):
    """Refuse an unusable output folder before any work starts.

    Returns:
        ``(stale, lock)``: ``stale`` is True when ``path`` holds only the start of a run that was
        stopped before its first checkpoint (a plain re-run starts over there, the caller clears it;
        ``--resume`` is refused); ``lock`` is the output lock the caller holds while it runs.
    """
    from lmslim.core.guard import check_output

    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite starts it again; pass only one")
    stale = _killed_before_first_checkpoint(path)
    if resume:
        if stale:
            raise UserError(f"nothing to resume: the run in {path} stopped before its first checkpoint; run the "
                            "same command without --resume to start it over")
        if not (path / "checkpoints").is_dir():
            raise UserError(f"nothing to resume: {path} holds no checkpoints; drop --resume to start a new run")
    elif path.is_dir() and not any(path.iterdir()):
        stale = True  # an empty folder: nothing to lose
    elif path.is_dir() and not (overwrite or stale):
        raise UserError(f"output {path} already exists and is not empty; choose a new --out, pass --resume to "
                        "continue its run, or --overwrite to start again")
    lock = check_output(path, inputs=inputs, overwrite=overwrite or stale, resume=resume)
    return stale and path.exists(), lock


@app.command()
def train(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model spec: folder, builtin:<name>, .gguf, or config:FILE.json (from scratch)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides key=value, e.g. optim.lr=1e-4."),
    data: str = typer.Option(..., "--data", help="Training data spec (file, folder, builtin:wiki:train, ...)."),
    task: str = typer.Option("clm", "--task", help="clm | seq-cls | token-cls"),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: final model, metrics.jsonl, checkpoints."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training config YAML (see configs/train/)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides max_steps)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Validation data spec (evaluation, "
                                            "best checkpoint, early stopping)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    resume_changes: Optional[str] = typer.Option(None, "--resume-changes", help="With --resume: config keys or "
                                                 "sections allowed to differ from the checkpoint's run, e.g. "
                                                 "optim.lr,schedule (the new values apply)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a non-empty --out and start again."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="config: models: take the tokenizer from "
                                            "this model spec (default: lmslim's byte-level tokenizer)."),
    text_column: Optional[str] = typer.Option(None, "--text-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    threads: Optional[int] = ThreadsOpt, device: str = DeviceOpt, trust_remote_code: bool = TrustOpt,
    nproc: Optional[int] = NprocOpt, nnodes: int = NnodesOpt, node_rank: int = NodeRankOpt,
    master_addr: str = MasterAddrOpt, master_port: Optional[int] = MasterPortOpt,
) -> None:
    """Train MODEL on --data for --task; writes the final model (lmslim eval accepts it) into --out.

    With --nproc N the same command runs as N data-parallel processes (DDP, or FSDP with
    distributed.strategy=fsdp); see docs/distributed.md.
    """
    from lmslim.core.runtime import Runtime
    from lmslim.data.spec import load_data
    from lmslim.train.config import TrainConfig
    from lmslim.train.data import tokenize
    from lmslim.train.loop import train as run_train
    from lmslim.train.tasks import load_for_training

    if task not in TRAIN_TASKS:
        raise UserError(f"cannot train task {task!r}; choose one of: {', '.join(TRAIN_TASKS)}")
    items = list(overrides or [])
    if max_steps is not None:
        if max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {max_steps}")
        items.append(f"max_steps={max_steps}")
    cfg = TrainConfig.from_yaml(config, items)
    stale, lock = check_out_dir(out_dir, resume, overwrite, [model, tokenizer, data, eval_data, config])
    hold(lock)
    if nproc is not None:
        from lmslim.cli.launch import launch

        launch(ctx.obj["argv"], nproc, nnodes, node_rank, master_addr, master_port, threads, cfg.distributed, model,
               train=cfg, evaluates=eval_data is not None)
        return
    from lmslim.modelio import resolve
    from lmslim.train import distributed

    # Build cached assets (tiny models, GGUF conversions, fetched models) BEFORE joining the process group:
    # once it is up, transformers' save_pretrained writes nothing on ranks other than 0.
    for spec in (model, tokenizer):
        if spec and not spec.startswith("config:"):
            resolve(spec)
    # Under torchrun: join the process group now, before any rank writes into --out.
    rt = distributed.setup(Runtime.create(device=device, threads=threads), cfg.distributed.timeout_s)
    train_data = load_data(data, task=task, text_column=text_column, label_column=label_column)
    valid = load_data(eval_data, task=task, text_column=text_column, label_column=label_column) if eval_data else None
    lm = load_for_training(model, task, train_data, rt, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    labels = [str(v) for _, v in sorted(lm.model.config.id2label.items())] if task != "clm" else None
    ts = tokenize(train_data, lm.tokenizer, task, cfg.batch.max_length, cfg.batch.pack, labels)
    vs = tokenize(valid, lm.tokenizer, task, cfg.batch.max_length, cfg.batch.pack, labels) if valid else None
    if (overwrite or stale) and out_dir.exists() and rt.is_main:
        shutil.rmtree(out_dir)
    distributed.barrier(rt)
    with remove_unfinished_start(out_dir):
        result = run_train(lm.model, ts, cfg, rt, eval_data=vs, out_dir=out_dir, resume=resume,
                           resume_changes=resume_changes or ())
    out.print(f"trained {result.steps} steps: final loss {result.final_loss:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s, {result.elapsed_s:.1f} s")
    for k, v in result.eval.items():
        out.print(f"  {k}: {v:.4f}")
    if result.stopped_early:
        out.print(f"  stopped early: best {cfg.early_stop.metric} {result.best_metric:.4f} at step {result.best_step}")
    out.print(f"wrote {out_dir}")
