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

Example:
    >>> from lmslim.train.checkpoint import rng_state, set_rng_state
    >>> import random; s = rng_state(); a = random.random(); set_rng_state(s); a == random.random()
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmslim.core.errors import UserError

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


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _publish(tmp: Path, folder: Path) -> None:
    """fsync every file of the finished ``tmp`` folder, then rename it to ``folder`` (replacing an old one)."""
    for f in tmp.iterdir():
        _fsync(f)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    with contextlib.suppress(OSError):
        fd = os.open(folder.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


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
        _publish(tmp, folder)
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
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(runtime)
    return folder


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint (tensors and plain values only: ``weights_only`` loading)."""
    try:
        return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
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
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"checkpoint {folder} cannot be loaded ({first}); it belongs to another model or is "
                        "damaged; start a new run with --overwrite") from e
    return state, meta
