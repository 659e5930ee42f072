"""The one place that decides device, dtype, precision (autocast), threads, rank and seeding.

Techniques and measurements receive a :class:`Runtime` and never look at
``torch.cuda.is_available()`` themselves. Training asks it for the autocast context and whether fp16
needs a gradient scaler, so the loop never branches on the device.

Example:
    >>> from lmslim.core.runtime import Runtime
    >>> rt = Runtime.create(device="cpu", threads=1)
    >>> rt.device.type
    'cpu'
    >>> rt.with_precision("auto").precision  # fp32 on a CPU: bf16/fp16 autocast are slower there
    'fp32'
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from typing import ContextManager

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
    amp_dtype: torch.dtype | None = None  # autocast compute dtype for training; None = plain fp32 math
    local_rank: int = 0

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
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if dev.type == "cuda" and dev.index is None and world > 1:
            dev = torch.device("cuda", local_rank)  # one GPU per process of a torchrun job
        rt = cls(device=dev, dtype=_DTYPES[dtype], threads=torch.get_num_threads(), rank=rank, world_size=world,
                 local_rank=local_rank)
        if dev.type == "cpu" and rt.dtype in (torch.bfloat16, torch.float16):
            log.warning("%s on this CPU is usually several times slower than float32; measure before relying on it",
                        dtype)
        return rt

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------ precision
    def with_precision(self, precision: str = "auto") -> "Runtime":
        """A copy whose :meth:`autocast` runs in ``precision`` (weights stay in ``dtype``, normally fp32).

        Args:
            precision: ``auto`` (bf16 on a GPU that supports it, else fp32), ``fp32``, ``bf16`` or ``fp16``
                (fp16 needs :meth:`grad_scaler` for dynamic loss scaling).

        Warns (logging, rank 0) when the chosen precision is usually slower than fp32 on this device.
        """
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if amp is not None and self.is_main:
            if self.device.type == "cpu":
                log.warning("%s autocast on a CPU is usually slower than fp32 (measured several times slower on "
                            "AVX2/AVX-512 machines without AMX); use precision fp32 unless you have measured it",
                            precision)
            elif amp is torch.bfloat16 and not torch.cuda.is_bf16_supported():
                log.warning("this GPU has no native bf16; bf16 autocast will be slow, use fp16 instead")
        return replace(self, amp_dtype=amp)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> ContextManager:
        """The mixed-precision context for forward passes (a no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without dynamic loss scaling; bf16 has fp32's exponent range and does not."""
        return self.amp_dtype is torch.float16

    def grad_scaler(self, init_scale: float = 2.0 ** 16) -> "torch.amp.GradScaler":
        """A GradScaler that is enabled only when :attr:`needs_grad_scaler` (else its calls pass through)."""
        return torch.amp.GradScaler(self.device.type, init_scale=init_scale, enabled=self.needs_grad_scaler)

    def reuse_freed_host_memory(self) -> bool:
        """Keep large freed host buffers in the process heap instead of handing them back to the OS.

        Training frees and re-allocates the same large buffers every step (activations, the batch x length x
        vocabulary logits and their gradients). glibc serves blocks above its mmap threshold with fresh
        ``mmap`` pages and returns them on ``free``, so every step pays page faults to zero them again.
        Raising the mmap and trim thresholds (``mallopt``) lets freed blocks be reused. Process-wide and
        permanent for the process; higher resident memory is the price. A no-op (False) off glibc.

        Returns:
            True when the allocator was reconfigured.
        """
        from lmslim.core.hostmem import glibc

        libc = glibc()
        if libc is None:
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        # 2**30 is far above any single training buffer here and within what mallopt accepts on 64-bit.
        ok = libc.mallopt(m_mmap_threshold, 2 ** 30) == 1 and libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1
        if ok and self.is_main:
            log.debug("host allocator: freed buffers are kept for reuse (mmap/trim thresholds raised)")
        return ok

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        """The torch.distributed backend for this device: nccl between GPUs, gloo between CPU processes."""
        return "nccl" if self.device.type == "cuda" else "gloo"
