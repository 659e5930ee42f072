"""Running ``lmslim train`` in subprocesses and comparing runs: shared by the DDP/FSDP and TP/PP parity tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def write_corpus(path: Path) -> Path:
    """120 seeded documents of 10–60 words: enough for 20 short steps at any batch layout."""
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran in the park and birds sang songs of old times".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))
                                for _ in range(120)))
    return path


def lmslim(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmslim.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_train(text: Path, out: Path, common: list[str], *extra: str, nproc: int | None = None
              ) -> subprocess.CompletedProcess:
    args = ["train", "builtin:tiny-llama", "--data", str(text), "--out", str(out), *common, *extra]
    if nproc:
        args += ["--nproc", str(nproc)]
    r = lmslim(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
