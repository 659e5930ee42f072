"""The one place that decides device, dtype, threads and seeding.

Techniques and measurements receive a :class:`Runtime` and never look at
``torch.cuda.is_available()`` themselves.

Example:
    >>> from lmslim.core.runtime import Runtime
    >>> rt = Runtime.create(device="cpu", threads=1)
    >>> rt.device.type
    'cpu'
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from lmslim.core.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Device, dtype, thread count, rank and world size for one process."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    threads: int = 1
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str = "auto", dtype: str = "float32", threads: int | None = None) -> "Runtime":
        """Resolve ``auto`` choices and apply the thread count to torch.

        Args:
            device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:i]``.
            dtype: weight/compute dtype name (``float32``, ``bfloat16``, ``float16``).
            threads: intra-op CPU threads; default: all cores torch sees.
        """
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise UserError(f"unknown device {device!r}; use cpu, cuda or auto") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if dtype not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
        if threads is not None and threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        if threads is not None:
            torch.set_num_threads(threads)
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        rt = cls(device=dev, dtype=_DTYPES[dtype], threads=torch.get_num_threads(), rank=rank, world_size=world)
        if dev.type == "cpu" and rt.dtype in (torch.bfloat16, torch.float16):
            log.warning("%s on this CPU is usually several times slower than float32; measure before relying on it",
                        dtype)
        return rt

    @property
    def is_main(self) -> bool:
        return self.rank == 0
