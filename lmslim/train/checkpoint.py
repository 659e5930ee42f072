"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``DIR/checkpoints/step-NNNNNNN`` holding

- ``model.safetensors``: the model's weights (shared/tied tensors stored once);
- ``extra.safetensors``: trainable parameters outside the model (e.g. a distillation projection);
- ``trainer_state.pt``: optimizer, scheduler, grad scaler, Python/NumPy/torch RNG states, data
  position, early-stopping state — only tensors and plain Python values, so it loads with
  ``torch.load(weights_only=True)`` (no pickle code execution);
- ``meta.json``: step, fingerprint of model and config (to refuse resuming another run).

It is built in a temporary sibling folder, every file is fsynced, and the folder is renamed into
place, so a crash leaves either the previous checkpoint or the new one, never half of one.
:func:`resume` loads the latest one into a run; it refuses another model, task, labels, world size
or config, except for the keys the caller explicitly allows (:func:`check_resume_changes`).

Example:
    >>> from lmslim.train.checkpoint import rng_state, set_rng_state
    >>> import random; s = rng_state(); a = random.random(); set_rng_state(s); a == random.random()
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.core.faults import failpoint
from lmslim.core.io import publish_dir

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain values (safe for ``weights_only`` loading)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(model: nn.Module, extra: dict[str, nn.Parameter]) -> str:
    """Hash of the architecture: class, parameter names and shapes (not values)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in list(model.state_dict().items()) + list(extra.items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def save_checkpoint(folder: Path, model: nn.Module, extra: dict[str, nn.Parameter], trainer_state: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (temp folder, fsync every file, rename)."""
    from safetensors.torch import save_file, save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (stored once)
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        failpoint("checkpoint")  # crash tests: files written, not yet renamed into place
        publish_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_sharded_checkpoint(folder: Path, runtime: Any, write_shards: Any, trainer_state: dict[str, Any],
                            meta: dict[str, Any]) -> Path:
    """Atomic sharded checkpoint (FSDP): every rank writes its shards, rank 0 the rest, then renames.

    Collective: every rank calls it. ``write_shards(tmp)`` writes this rank's shards into the shared
    temporary folder (``torch.distributed.checkpoint``); rank 0 adds ``trainer_state.pt`` and
    ``meta.json``, fsyncs every file and renames the folder into place.
    """
    from lmslim.train.distributed import barrier

    tmp = folder.parent / f".{folder.name}.partial"  # the same name on every rank (they share the folder)
    if runtime.is_main:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(runtime)
    write_shards(tmp)
    barrier(runtime)
    if runtime.is_main:
        try:
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
            failpoint("checkpoint")
            publish_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(runtime)
    return folder


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint (tensors and plain values only: ``weights_only`` loading)."""
    try:
        return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in torch's zip reader or in unpickling
        raise UserError(f"checkpoint {folder} cannot be loaded ({str(e).splitlines()[0][:200]}); start a new run "
                        "with --overwrite") from e


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints under ``root`` (oldest first)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model: nn.Module, extra: dict[str, nn.Parameter],
                    device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``/``extra`` in place; return (trainer_state, meta)."""
    from safetensors.torch import load_file, load_model

    try:
        meta = json.loads((folder / "meta.json").read_text())
        load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
        if extra:
            tensors = load_file(str(folder / "extra.safetensors"), device=str(device))
            with torch.no_grad():
                for k, p in extra.items():
                    p.copy_(tensors[k])
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors, torch's zip reader and unpickling raise many types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"checkpoint {folder} cannot be loaded ({first}); it belongs to another model or is "
                        "damaged; start a new run with --overwrite") from e
    return state, meta


def resume(root: Path, model: nn.Module, extra: dict[str, nn.Parameter], optimizer: Any, scheduler: Any,
           scaler: Any, runtime: Any, config: Any, model_fp: str, data: Any,
           allowed: tuple[str, ...] = (), load_shards: Any = None) -> dict[str, Any]:
    """Load the latest checkpoint under ``root`` into the training objects; return its loop state.

    Refuses a checkpoint of another model, task, labels or world size, and a config that differs in keys
    other than :data:`~lmslim.train.config.RESUMABLE_CHANGES` and ``allowed`` (the caller's explicit
    ``resume_changes``). Allowed ``optim.*`` / ``schedule.*`` changes really apply: loading the optimizer
    and scheduler states would bring back the old lr, betas, weight decay and base lr, so this config's
    values are put back into the param groups and the lr is recomputed for the resumed step.
    """
    from lmslim.train import distributed as dist_
    from lmslim.train.config import NOT_RESUMABLE, RESUMABLE_CHANGES, TrainConfig

    found = list_checkpoints(root)
    if not found:
        raise UserError(f"nothing to resume: {root} holds no checkpoint; drop --resume to start a new run")
    folder = found[-1]
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("fingerprint") != model_fp or meta.get("task") != data.task:
        raise UserError(f"checkpoint {folder} belongs to another model or task ({meta.get('task')}); resume "
                        "with the same MODEL and --task, or start a new run with --overwrite")
    if meta.get("labels") != data.label_names:
        raise UserError(f"checkpoint {folder} was trained with labels {meta.get('labels')}, the data now gives "
                        f"{data.label_names}; resume with the same data")
    old = TrainConfig.from_dict(meta.get("config", {}))
    changed = [k for k in config.changed_keys(old)
               if k in NOT_RESUMABLE or not _covered(k, RESUMABLE_CHANGES + tuple(allowed))]
    fixed = [k for k in changed if k in NOT_RESUMABLE]
    if fixed:
        raise UserError(f"checkpoint {folder} was made with another {fixed[0]}, which cannot change on resume: "
                        f"{NOT_RESUMABLE[fixed[0]]}; start a new run with --overwrite")
    if changed:
        raise UserError(f"checkpoint {folder} was made with a different training config ({', '.join(changed)}); "
                        f"resume with the same settings, allow the change explicitly (--resume-changes "
                        f"{','.join(changed)}) or start a new run with --overwrite")
    saved_world = int(meta.get("world_size") or 1)
    if saved_world != runtime.world_size:
        raise UserError(f"checkpoint {folder} was written by {saved_world} process(es) and its data position and "
                        f"random states are per process; resume with --nproc {saved_world} (now {runtime.world_size})")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # this config's
    if load_shards is not None:  # pipeline stages: each its own parameters and optimizer state
        state = load_trainer_state(folder)
        load_shards(folder, optimizer)
    elif meta.get("strategy") == "fsdp" or int(meta.get("tp") or 1) > 1:  # sharded (DCP) checkpoints
        state = load_trainer_state(folder)
        dist_.load_sharded(folder, model, optimizer)
    else:
        state, _ = load_checkpoint(folder, model, extra, runtime.device)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if load_shards is not None:  # the optimizer's param groups were not loaded: take the lr of the schedule
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    if state["scaler"]:  # empty when saved without loss scaling (a precision change may turn it on now)
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng_ranks"][runtime.rank] if "rng_ranks" in state else state["rng"])
    new = [k for k in config.changed_keys(old) if k.startswith(("optim.", "schedule."))]
    if new:
        _apply_hyperparameters(optimizer, scheduler, fresh)
    if runtime.is_main:
        log.info("resumed from %s (step %d)", folder, state["loop"]["step"])
        if config.changed_keys(old):
            flat_old, flat_new = _flat(old.to_dict()), _flat(config.to_dict())
            log.warning("resuming %s with changed settings: %s (lr now %.3g)", folder.name,
                        ", ".join(f"{k} {flat_old.get(k)} -> {flat_new.get(k)}" for k in config.changed_keys(old)),
                        optimizer.param_groups[0]["lr"])
    return dict(state["loop"])


def check_resume_changes(keys: str | Sequence[str]) -> tuple[str, ...]:
    """Validate the config keys a caller allows to change on resume (``train(..., resume_changes=...)``).

    Args:
        keys: dotted keys or section names (``optim.lr``, ``schedule``); a string is split on commas.

    Returns:
        The keys, stripped, without duplicates.

    Raises:
        UserError: an unknown key (with a "did you mean" hint) or one that can never change
            (:data:`~lmslim.train.config.NOT_RESUMABLE`).

    Example:
        >>> check_resume_changes("optim.lr, schedule")
        ('optim.lr', 'schedule')
    """
    from lmslim.train.config import NOT_RESUMABLE, _hint, all_keys

    items = keys.split(",") if isinstance(keys, str) else list(keys)
    out: list[str] = []
    known = all_keys()
    for raw in items:
        if not isinstance(raw, str):
            raise UserError(f"resume changes must be config keys like optim.lr, got {raw!r}")
        key = raw.strip()
        if not key:
            continue
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise UserError(f"cannot allow resume changes of unknown config key {key!r}{_hint(key)}")
        if key in NOT_RESUMABLE:  # a section that holds one (optim) stays allowed for its other keys
            raise UserError(f"{key} cannot change on resume: {NOT_RESUMABLE[key]}; start a new run with --overwrite")
        if key not in out:
            out.append(key)
    return tuple(out)


def _covered(key: str, allowed: Sequence[str]) -> bool:
    """Whether dotted ``key`` is one of ``allowed`` or lies in an allowed section."""
    return any(key == a or key.startswith(a + ".") for a in allowed)


def _apply_hyperparameters(optimizer: Any, scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """Put this config's hyperparameters back after loading a checkpoint's optimizer and scheduler states.

    ``fresh`` holds the param groups' values before loading (lr, initial_lr, betas, weight decay, ...);
    the scheduler's base lrs follow ``initial_lr`` and the lr is recomputed by the (new) schedule at the
    resumed step, exactly as if the run had used these values all along from here on.
    """
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (the loop logs it)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
