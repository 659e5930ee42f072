"""One trial of a search: a recipe written to the search folder, run by ``lmslim compress``, read back.

A trial is exactly what a user could run by hand: the recipe YAML under ``DIR/recipes`` and the run
under ``DIR/trials`` (both named by the recipe's hash). It runs in its own ``lmslim compress``
process, so its memory is its own, an interruption leaves the usual resumable ``.partial`` folder,
and the recipe written as the search's answer is reproduced by the command that made it. Two workers
drawing the same recipe run it once: the second waits on the first's lock and reads its results.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmslim.core.errors import UserError, clip
from lmslim.core.io import atomic_write_text


@dataclass(frozen=True)
class Settings:
    """What every trial's recipe shares: the model, its data and the measurement."""

    model: str
    data: dict[str, str]
    eval: dict[str, Any]
    bench: dict[str, Any]
    threads: int | None = None

    def recipe(self, stages: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return {"name": name, "model": self.model, "data": dict(self.data), "stages": stages,
                "eval": dict(self.eval), "bench": dict(self.bench), "measure_each_stage": False}


def recipe_hash(stages: list[dict[str, Any]], settings: Settings) -> str:
    text = json.dumps([stages, settings.model, settings.data, settings.eval, settings.bench], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_trial(root: Path, stages: list[dict[str, Any]], settings: Settings) -> tuple[dict[str, Any], bool]:
    """Run (or reuse) the trial with these stages; returns (results.json, reused)."""
    from filelock import FileLock

    key = recipe_hash(stages, settings)
    recipe_path = root / "recipes" / f"{key}.yaml"
    out = root / "trials" / key
    results = out / "results.json"
    (root / "trials").mkdir(parents=True, exist_ok=True)
    failed = root / "trials" / f".{key}.error"  # a recipe this model cannot take fails the same way again
    with FileLock(str(root / "trials" / f".{key}.search-lock")):
        if results.is_file():
            return json.loads(results.read_text()), True
        if failed.is_file():
            raise UserError(failed.read_text().strip())
        atomic_write_text(recipe_path, yaml.safe_dump(settings.recipe(stages, f"trial-{key}"), sort_keys=False))
        cmd = [sys.executable, "-m", "lmslim", "compress", "--recipe", str(recipe_path), "--out", str(out),
               "--measure-cache", str(root / "cache" / "measure"), "--stage-cache", str(root / "cache" / "stages")]
        if settings.threads:
            cmd += ["--threads", str(settings.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["(no output)"]
            last = lines[-1].removeprefix("error: ")
            message = f"trial {key}: {clip(last, 400)}"
            if proc.returncode == 2:  # refused (bad combination), not killed or crashed: remember it
                atomic_write_text(failed, message + "\n")
            raise UserError(message)
        return json.loads(results.read_text()), False


def numbers(results: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    """Baseline and final values of ``metrics`` (and size, speed, memory) from a compress result."""
    base, last = results["variants"][0], results["variants"][-1]

    def get(v: dict, key: str) -> float | None:
        for part in ("eval", "bench"):
            value = (v.get(part) or {}).get(key)
            if value is not None:
                return float(value)
        return None

    if len(results["variants"]) == 1:  # every stage left the weights as they were
        last = base
    keys = dict.fromkeys([*metrics, "perplexity", "size_mb", "decode_tokens_per_s", "peak_rss_mb", "prefill_ms_p50"])
    return {"final": {k: get(last, k) for k in keys}, "baseline": {k: get(base, k) for k in keys},
            "engine": ((last.get("bench") or {}).get("engine") or (last.get("eval") or {}).get("engine")
                       or {}).get("name", "torch"),
            "weights_sha256": last.get("weights_sha256"), "seconds": results.get("seconds"),
            "stage_cache_hits": results.get("stage_cache_hits", 0)}
