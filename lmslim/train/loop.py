"""The training loop: one explicit function, read top to bottom.

Per optimizer step: take ``grad_accum`` micro-batches; for each, run the objective under the
runtime's autocast, weight its mean loss by the micro-batch's share of the step's loss terms
(``units / step_units``) and back-propagate (through the GradScaler for fp16); then unscale, clip,
step, update the scale and the lr schedule. Weighting by units instead of ``1/k`` makes an
accumulated step exactly the gradient of one big batch even when micro-batches hold different
numbers of tokens. Every so often: log, evaluate (early stopping, best checkpoint) and checkpoint.
Each step's loss and gradient norm are judged before the update (``lmslim.train.health``): a run that
diverges or collapses stops with :class:`TrainingDiverged`, and only healthy weights are saved.

The objective is pluggable: ``objective(model, batch) -> (loss, logs)`` where ``loss`` is the mean
over the batch's loss terms (``batch.units`` of them) and ``logs`` maps names to floats. The default
is the model's own loss from ``batch["labels"]``. Trainable parameters outside the model (an
``nn.Module`` objective's own parameters, ``extra_modules``) are optimised and checkpointed with it.

Example:
    >>> from lmslim.modelio import load_model
    >>> from lmslim.core.runtime import Runtime
    >>> from lmslim.data.spec import Data
    >>> from lmslim.train.config import TrainConfig
    >>> from lmslim.train.data import tokenize
    >>> from lmslim.train.loop import train
    >>> lm = load_model("builtin:tiny-llama")
    >>> ts = tokenize(Data("x", "clm", documents=["the cat sat on the mat. " * 20]), lm.tokenizer, "clm", 64)
    >>> cfg = TrainConfig.from_dict({"max_steps": 3, "optim": {"lr": 1e-3}, "batch": {"batch_size": 2}})
    >>> r = train(lm.model, ts, cfg, Runtime.create("cpu"))
    >>> r.steps, len(r.losses)
    (3, 3)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.core.faults import failpoint
from lmslim.core.runtime import Runtime
from lmslim.train import checkpoint as ckpt
from lmslim.train import distributed as dist_
from lmslim.train.config import TrainConfig
from lmslim.train.data import Batch, Batcher, TokenizedSet
from lmslim.train.health import HealthMonitor, TrainingDiverged  # noqa: F401 (callers import it from here)
from lmslim.train.metrics import MetricsLogger
from lmslim.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, float]]"]
Evaluator = Callable[[nn.Module], "dict[str, float]"]
# A callback sees (step, record) after every optimizer step; returning True stops training cleanly.
Callback = Callable[[int, "dict[str, Any]"], "bool | None"]


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # training loss of every optimizer step (this process's run, after resume)
    final_loss: float
    tokens_seen: int
    elapsed_s: float
    tokens_per_s: float
    eval: dict[str, float] = field(default_factory=dict)  # last evaluation
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    out_dir: Path | None = None


def task_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Default objective: the model's own mean loss for ``batch["labels"]``."""
    return model(**batch).loss, {}


def trainable_extras(objective: Any, extra_modules: dict[str, nn.Module] | None) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the model, by unique name (objective's under ``objective.``)."""
    out: dict[str, nn.Parameter] = {}
    sources = dict(extra_modules or {})
    if isinstance(objective, nn.Module):
        sources["objective"] = objective
    for prefix, module in sources.items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{name}"] = p
    return out


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of storing its activations."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support activation checkpointing; "
                        "set precision.activation_checkpointing=false")
    # Non-reentrant checkpointing works with frozen inputs and keyword arguments, and is torch's recommendation.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def accumulate(model: nn.Module, micro: Sequence[Batch], objective: Objective, runtime: Runtime,
               scaler: torch.amp.GradScaler, step_units: int | None = None,
               data_parallel: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward + backward over the micro-batches of one step; returns the step's loss and logs.

    Each micro-batch's mean loss is weighted by ``units / step_units`` so the summed gradient is that
    of the mean over all the step's loss terms (exact for variable-length micro-batches).

    Under DDP/FSDP, ``model`` is the wrapped module and ``step_units`` the units of every rank's
    micro-batches together: each rank back-propagates its share of the global mean times the world size,
    because DDP and FSDP average gradients over ranks. Only the last micro-batch communicates
    (``no_sync`` before it). The returned loss is this rank's share (sum it over ranks for the mean).
    ``data_parallel``: the number of ranks gradients are averaged over when it is not the world size
    (tensor parallelism: the ranks of one model copy see the same batch).
    """
    step_units = step_units or sum(b.units for b in micro)
    world = data_parallel if data_parallel is not None else runtime.world_size if runtime.is_distributed else 1
    total = torch.zeros((), device=runtime.device)
    logs: dict[str, float] = {}
    for i, b in enumerate(micro):
        b = b.to(runtime.device)
        with dist_.sync_gradients(model, sync=i == len(micro) - 1):
            with runtime.autocast():
                loss, extra = objective(model, b)
            weighted = loss.float() * (b.units / step_units)
            scaler.scale(weighted * world if world > 1 else weighted).backward()
        total += weighted.detach()
        for k, v in extra.items():
            logs[k] = logs.get(k, 0.0) + float(v) * b.units / step_units
    return total, logs


def _stream(batcher: Batcher, epoch: int, index: int, num_workers: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """Micro-batches from (epoch, index) on, as (epoch, next index, batch); crosses epochs."""
    while True:
        plan = batcher.epoch(epoch)
        for i, batch in enumerate(batcher.batches(plan[index:], num_workers), start=index):
            yield epoch, i + 1, batch
        epoch, index = epoch + 1, 0


def total_steps(config: TrainConfig, batcher: Batcher) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * len(batcher.epoch(0)) / config.batch.grad_accum))


def train(model: nn.Module, train_data: TokenizedSet, config: TrainConfig, runtime: Runtime, *,
          eval_data: TokenizedSet | None = None, objective: Objective | None = None,
          extra_modules: dict[str, nn.Module] | None = None, evaluator: Evaluator | None = None,
          out_dir: str | Path | None = None, resume: bool = False, callbacks: Sequence[Callback] = (),
          save_final: bool = True, resume_changes: Sequence[str] = ()) -> TrainResult:
    """Train ``model`` in place on ``train_data``.

    Args:
        model: a torch/HF model; moved to ``runtime.device``, left in train mode while training.
        train_data: from :func:`lmslim.train.data.tokenize`.
        config: a :class:`TrainConfig`.
        runtime: device/precision/rank; its precision is replaced by ``config.precision.mode``.
        eval_data: validation examples; enables evaluation, best checkpoint and early stopping.
        objective: ``objective(model, batch) -> (mean loss, logs)``; default :func:`task_loss`. If it is
            an ``nn.Module``, its trainable parameters are optimised and checkpointed too.
        extra_modules: more modules whose trainable parameters join the optimizer and checkpoints.
        evaluator: ``evaluator(model) -> metrics``; default :func:`lmslim.train.tasks.evaluate` on ``eval_data``.
        out_dir: where checkpoints, ``metrics.jsonl``, TensorBoard events and the final model go;
            None trains in memory only. Rank 0 writes; the caller checks the folder is usable.
        resume: continue from the latest checkpoint in ``out_dir/checkpoints``.
        callbacks: called after each step with (step, record); returning True stops (with a checkpoint).
        save_final: save the final model (``save_pretrained`` + tokenizer) into ``out_dir``.
        resume_changes: config keys or sections (``optim.lr``, ``schedule``) that may differ from the
            checkpoint's config on resume; their new values apply from the resumed step on (the optimizer's
            hyperparameters, the lr schedule). Without them such a change is refused. Model, task, labels,
            world size, ``optim.name`` and ``distributed.strategy`` must always match.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the run diverged or collapsed (``health`` config, :mod:`lmslim.train.health`); only
            checkpoints written while it was healthy are kept, and the message names the last one.
        UserError: a checkpoint of another model/config on resume, a bad early-stopping metric, ...
    """
    from lmslim.train import parallel
    from lmslim.train.tasks import evaluate, metric_names

    rt = dist_.setup(runtime.with_precision(config.precision.mode), config.distributed.timeout_s)
    layout = parallel.layout(rt, config.distributed)  # pp x dp x tp; dp = the world without tp/pp
    if config.host_memory == "reuse":
        rt.reuse_freed_host_memory()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise UserError("resume needs the output folder of the run to continue")
    allowed = ckpt.check_resume_changes(resume_changes)
    if allowed and not resume:
        raise UserError(f"resume changes ({', '.join(allowed)}) only apply when resuming a run")
    objective = objective or task_loss
    model.to(rt.device)
    for module in (extra_modules or {}).values():
        module.to(rt.device)
    if isinstance(objective, nn.Module):
        objective.to(rt.device)
    if config.precision.activation_checkpointing:
        enable_activation_checkpointing(model)
    extras = trainable_extras(objective, extra_modules)
    model_fp = ckpt.fingerprint(model, extras)  # before wrapping: plain names and full shapes
    sharded = rt.is_distributed and (config.distributed.strategy == "fsdp" or layout.tp > 1)
    if sharded and extras:
        plan = "distributed.tp" if layout.tp > 1 else "distributed.strategy=fsdp"
        raise UserError(f"{plan} cannot train parameters outside the model yet (here: "
                        f"{', '.join(sorted(extras)[:3])}); use distributed.strategy=ddp")
    if layout.model_parallel:
        parallel.check_model(config.distributed, model.config.to_dict())
    pipe = parallel.pipeline(model, layout, config, rt, extras, eval_data is not None or evaluator is not None,
                             custom_objective=objective is not task_loss)
    if sharded:
        from lmslim.nn.blocks import transformer_blocks

        blocks = transformer_blocks(model)[1]
    else:
        blocks = []
    # ``model`` stays the plain module (saving, evaluation, names); ``wrapped`` is what forward runs on.
    wrapped = dist_.wrap(model, rt, config.distributed, blocks, seed=config.seed, layout=layout)
    if eval_data is not None and evaluator is None:
        names = metric_names(eval_data.task)
        if config.early_stop.metric not in names:
            raise UserError(f"early_stop.metric {config.early_stop.metric!r} is not measured for task "
                            f"{eval_data.task}; choose one of {', '.join(names)}")
        evaluator = lambda m: evaluate(m, eval_data, rt, config)  # noqa: E731
    modules = [model, *(extra_modules or {}).values()] + ([objective] if isinstance(objective, nn.Module) else [])
    named = pipe.named_parameters() if pipe else list(model.named_parameters())  # pp: this stage's own
    optimizer = build_optimizer(named + list(extras.items()), config.optim, modules)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batcher = Batcher(train_data, config.batch, config.seed, layout.dp_rank, layout.dp)
    steps = total_steps(config, batcher)
    scheduler = build_scheduler(optimizer, config.schedule, steps)
    scaler = rt.grad_scaler()
    ckpt_root = out / "checkpoints" if out is not None else None

    # Seed everything the step may draw from (dropout, objectives); the data order has its own RNG.
    torch.manual_seed(config.seed)
    import random

    import numpy as np
    random.seed(config.seed)
    np.random.seed(config.seed)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "index": 0, "tokens_seen": 0, "best": None, "best_step": None,
                             "bad_evals": 0}
    if resume:
        state = ckpt.resume(ckpt_root, model, extras, optimizer, scheduler, scaler, rt, config, model_fp,
                            train_data, allowed, load_shards=pipe.load if pipe else None)
    write = rt.is_main and out is not None
    health = HealthMonitor(config.health, named + list(extras.items()), rt, ckpt_root,
                           config.checkpoint.keep_last, write, state.get("health"))
    if rt.is_distributed and rt.is_main:
        log.info("training on %d processes (%s, %s, comm hook %s): ~%.1f MB sent per rank per step",
                 rt.world_size, rt.backend, config.distributed.strategy, config.distributed.comm_hook,
                 parallel.step_comm_bytes(model, config, layout, 0) / 1e6)
    if write:
        from lmslim.core.io import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "train_config.json", config.to_dict())
    logger = MetricsLogger(out if write else None, rt.is_main, steps, state["step"], config.log.tensorboard,
                           config.log.progress, config.log.progress_every_s)

    def save(kind: str) -> None:
        """Write a checkpoint; under torchrun every rank calls this (RNG states are gathered, FSDP shards)."""
        if out is None:
            return
        state["health"] = health.state_dict()
        rngs = dist_.all_gather_object(ckpt.rng_state(), rt)  # dropout etc. differ per rank
        trainer_state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs[0],
                         "loop": dict(state)}
        if rt.is_distributed:
            trainer_state["rng_ranks"] = rngs
        meta = {"step": state["step"], "fingerprint": model_fp, "task": train_data.task,
                "labels": train_data.label_names, "config": config.to_dict(), "kind": kind,
                **dist_.describe(rt, config.distributed)}
        folder = ckpt_root / f"step-{state['step']:07d}"
        if sharded or pipe:
            write_shards = (lambda tmp: pipe.save(tmp, optimizer)) if pipe else \
                (lambda tmp: dist_.save_sharded(tmp, model, optimizer))
            ckpt.save_sharded_checkpoint(folder, rt, write_shards, trainer_state, meta)
        elif write:
            ckpt.save_checkpoint(folder, model, extras, {"optimizer": optimizer.state_dict(), **trainer_state}, meta)
        health.saved(folder)  # pending until the next step's numbers confirm its weights; prunes (rank 0)
        dist_.barrier(rt)

    model.train()
    # A KV cache is useless while training and costs a copy of every layer's keys/values per forward
    # (transformers.Trainer turns it off too); off for the run, restored for the saved model.
    model_cfg = getattr(model, "config", None)
    use_cache = getattr(model_cfg, "use_cache", None)
    if use_cache:
        model_cfg.use_cache = False
    losses: list[float] = []
    last_eval: dict[str, float] = {}
    stopped_early = False
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "logs": {}}
    t_start = time.perf_counter()
    train_time = 0.0
    run_tokens = 0  # tokens of this process's run (a resumed run's tokens_seen includes earlier ones)
    stream = _stream(batcher, state["epoch"], state["index"], config.batch.num_workers)
    try:
        while state["step"] < steps:
            t0 = time.perf_counter()
            micro = []
            for _ in range(config.batch.grad_accum):
                state["epoch"], state["index"], batch = next(stream)
                micro.append(batch)
            lr = scheduler.get_last_lr()[0]
            n_tokens = sum(b.tokens for b in micro)
            step_units = None
            if rt.is_distributed:  # normalise by the loss terms of all ranks, not each rank's own
                step_units = int(dist_.all_reduce_sum([sum(b.units for b in micro)], rt, layout.dp_group)[0])
            if pipe:
                loss, logs = pipe.step(micro, step_units or sum(b.units for b in micro)), {}
            else:
                loss, logs = accumulate(wrapped, micro, objective, rt, scaler, step_units, layout.dp)
            if rt.is_distributed:
                dist_.average_gradients(list(extras.values()), rt)  # DDP/FSDP do not see these
                keys = sorted(logs)
                summed = dist_.all_reduce_sum([float(loss), n_tokens, *(logs[k] for k in keys)], rt, layout.dp_group)
                loss_value, n_tokens, logs = summed[0], int(summed[1]), dict(zip(keys, summed[2:]))
            else:
                loss_value = float(loss)
            scaler.unscale_(optimizer)  # clip and measure the true gradient, not the scaled one
            clip = pipe.clip_grad_norm_ if pipe else torch.nn.utils.clip_grad_norm_
            grad_norm = dist_.local(clip(params, config.optim.grad_clip or float("inf")))
            # Judged before the update is applied: a diverging step never reaches the weights.
            health.check_step(state["step"] + 1, loss_value, float(grad_norm), rt.needs_grad_scaler)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)  # honest tokens/s
            dt = time.perf_counter() - t0
            train_time += dt
            state["step"] += 1
            failpoint("train-step")  # crash tests: a step applied, none of its checkpoint written
            state["tokens_seen"] += n_tokens
            run_tokens += n_tokens
            losses.append(loss_value)
            window["loss"] += loss_value
            window["steps"] += 1
            window["tokens"] += n_tokens
            window["time"] += dt
            for k, v in logs.items():
                window["logs"][k] = window["logs"].get(k, 0.0) + v
            step = state["step"]
            record = {"step": step, "epoch": state["epoch"], "loss": loss_value, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": n_tokens / dt if dt > 0 else 0.0, **logs}
            if rt.needs_grad_scaler:
                record["loss_scale"] = float(scaler.get_scale())
            do_eval = evaluator is not None and config.eval.every_steps and step % config.eval.every_steps == 0
            is_last = step >= steps
            eval_metrics = {}
            if evaluator is not None and (do_eval or is_last):
                eval_metrics = _run_eval(evaluator, model)
                last_eval = eval_metrics
                improved = _track_best(state, eval_metrics, config)
                if improved and config.checkpoint.keep_best and out is not None:
                    health.check_weights(step)
                    _save_model(model, train_data.tokenizer, out / "best", rt)
                if config.early_stop.patience and state["bad_evals"] >= config.early_stop.patience:
                    stopped_early = True
            stop = any([cb(step, record) is True for cb in callbacks])  # every callback runs
            if rt.is_distributed and callbacks:  # one rank's stop stops all (they must stay in step)
                stop = dist_.all_reduce_sum([float(stop)], rt)[0] > 0
            if step % config.log.every_steps == 0 or eval_metrics or is_last or stop or stopped_early:
                w = window["steps"]
                logged = {"step": step, "epoch": state["epoch"], "loss": window["loss"] / w, "lr": lr,
                          "grad_norm": record["grad_norm"],
                          "tokens_per_s": window["tokens"] / window["time"] if window["time"] > 0 else 0.0,
                          "tokens_seen": state["tokens_seen"], "elapsed_s": time.perf_counter() - t_start,
                          **{k: v / w for k, v in window["logs"].items()},
                          **{k if k.startswith("eval") else f"eval_{k}": v for k, v in eval_metrics.items()}}
                if "loss_scale" in record:
                    logged["loss_scale"] = record["loss_scale"]
                if rt.is_distributed:
                    logged["comm_mb_per_step"] = parallel.step_comm_bytes(model, config, layout, step,
                                                                          n_tokens) / 1e6
                logger.step(step, logged, record)
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "logs": {}}
            else:
                logger.step(step, None, record)
            periodic = config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
            ending = is_last or stop or stopped_early
            # The end is checked without an output folder too: a broken model is never returned as trained.
            if ending or (out is not None and (periodic or eval_metrics)):
                if health.may_save(step, final=ending):
                    save("final" if is_last else "periodic")
            if stop or stopped_early:
                if stopped_early and rt.is_main:
                    log.warning("early stopping at step %d: %s did not improve for %d evaluations (best %.5g at "
                                "step %s)", step, config.early_stop.metric, state["bad_evals"], state["best"],
                                state["best_step"])
                break
    finally:
        logger.close()
        if use_cache:
            model_cfg.use_cache = use_cache
    health.finish()
    model.eval()
    if out is not None and save_final:
        # The final model is the best evaluated one when there is one (rank 0 saved it at that step).
        use_best = config.checkpoint.keep_best and state["best_step"] is not None
        if not use_best:
            _save_model(model, train_data.tokenizer, out / ".final", rt, pipe)
        if write:
            best = out / "best"
            _move_model_files(best if use_best and best.is_dir() else out / ".final", out)
        dist_.barrier(rt)
    elapsed = time.perf_counter() - t_start
    result = TrainResult(steps=state["step"], losses=losses, final_loss=losses[-1] if losses else float("nan"),
                         tokens_seen=state["tokens_seen"], elapsed_s=elapsed,
                         tokens_per_s=run_tokens / train_time if train_time else 0.0,
                         eval=last_eval, best_metric=state["best"], best_step=state["best_step"],
                         stopped_early=stopped_early, out_dir=out)
    if write:
        from lmslim.core.io import atomic_write_json

        summary = {k: v for k, v in result.__dict__.items() if k != "losses"}
        atomic_write_json(out / "train_result.json", {**summary, "precision": rt.precision,
                                                       "early_stop_metric": config.early_stop.metric,
                                                       "distributed": dist_.describe(rt, config.distributed)})
    return result


def _run_eval(evaluator: Evaluator, model: nn.Module) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in evaluator(model).items()}
    finally:
        model.train()


def _track_best(state: dict[str, Any], metrics: dict[str, float], config: TrainConfig) -> bool:
    es = config.early_stop
    if es.metric not in metrics:
        raise UserError(f"early_stop.metric {es.metric!r} is not among the evaluation metrics "
                        f"{sorted(metrics)}; set early_stop.metric to one of them")
    value = metrics[es.metric]
    best = state["best"]
    better = best is None or (value < best - es.min_delta if es.minimize else value > best + es.min_delta)
    if better:
        state["best"], state["best_step"], state["bad_evals"] = value, state["step"], 0
    else:
        state["bad_evals"] += 1
    return better


def _save_model(model: nn.Module, tokenizer: Any, folder: Path, rt: Runtime, pipe: Any = None) -> None:
    """The model (+ tokenizer) into ``folder`` atomically, by rank 0, in its registered format.

    Every rank must call it: an FSDP, tensor- or pipeline-parallel model's full weights are gathered first.
    """
    from lmslim.core.io import atomic_dir
    from lmslim.modelio import save_model

    state_dict = pipe.full_state_dict() if pipe else dist_.full_state_dict(model, rt)
    if rt.is_main:
        with atomic_dir(folder) as tmp:
            if state_dict is None:
                save_model(model, tokenizer, tmp)
            else:  # FSDP: the gathered full weights of a plain transformers model
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
    dist_.barrier(rt)


def _move_model_files(src: Path, dst: Path) -> None:
    """Copy a saved model's files into ``dst`` (each by atomic rename of a temporary copy)."""
    import os
    import shutil

    for f in sorted(src.iterdir()):
        if f.is_file():
            tmp = dst / f".{f.name}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, dst / f.name)
    if src.name.startswith("."):
        shutil.rmtree(src, ignore_errors=True)
