"""The envelope every JSON result carries: what was measured, on what, with which software, when."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Any

import torch

from lmslim import __version__


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def libraries() -> dict[str, str]:
    out = {"lmslim": __version__}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def envelope(kind: str, loaded, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Common header for a result of ``kind`` ("eval" or "bench") about a loaded model."""
    r = loaded.resolved
    return {
        "kind": kind,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"spec": r.spec, "source": r.source, "path": str(r.path) if r.path else None,
                  "weights_sha256": r.weights_hash(), "architecture": type(loaded.model).__name__},
        "machine": machine(device),
        "libraries": libraries(),
    }
