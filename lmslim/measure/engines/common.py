"""What measuring in any out-of-process engine shares: the worker run, the bench fields, the result header.

Each engine (``llama_cpp.py``, ``onnxruntime.py``) runs its file in a worker process (so peak RSS is the
engine's own) and reports the same fields as ``lmslim.measure.bench.bench``, computed here once from
the worker's timings and the engine-side cost shape.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError


def run_worker(worker: Path, args: dict[str, Any], engine: str, target: Path) -> dict[str, Any]:
    """Run ``worker`` (a script reading ``args`` as JSON on stdin, printing its timings as JSON)."""
    proc = subprocess.run([sys.executable, str(worker)], input=json.dumps(args), capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{engine} could not run {target}: {last}")
    return json.loads(proc.stdout)


def bench_fields(run: dict[str, Any], shape, cfg, size_bytes: int, engine_note: str) -> dict[str, Any]:
    """``bench``'s fields from a worker's timings (``prefill_ms``, ``decode_rates``, ``decode_steps_ms``, ...)."""
    from lmslim.measure import cost
    from lmslim.measure.bench import measure_bandwidth, percentile, verdict

    context = cfg.prompt_len + cfg.gen_len // 2
    prefill = run["prefill_ms"]
    bandwidth = measure_bandwidth()
    bytes_tok = cost.bytes_read_per_token(shape, context)
    bound = bandwidth * 1e9 / bytes_tok * cfg.batch
    rate = statistics.median(run["decode_rates"])
    prefill_flops = cost.forward_flops(shape, cfg.prompt_len, cfg.batch)
    result: dict[str, Any] = {
        "prefill_ms_p50": statistics.median(prefill), "prefill_ms_p95": percentile(prefill, 95),
        "prefill_tokens_per_s": cfg.batch * cfg.prompt_len / (statistics.median(prefill) / 1000),
        "decode_tokens_per_s": rate,
        "decode_ms_per_token_p50": statistics.median(run["decode_steps_ms"]),
        "decode_ms_per_token_p95": percentile(run["decode_steps_ms"], 95),
        "peak_rss_mb": run["peak_rss_mb"], "size_mb": size_bytes / 1e6,
        "params": shape.params, "nonzero_params": shape.nonzero_params,
        "flops_per_token": cost.flops_per_token(shape, context),
        "prefill_flops": prefill_flops,
        "train_flops_per_token": cost.training_flops_per_token(shape, cfg.prompt_len),
        "bytes_read_per_token": bytes_tok, "bandwidth_gbs": bandwidth,
        "decode_bound_tokens_per_s": bound, "fraction_of_bound": rate / bound,
        "prefill_gflops_per_s": prefill_flops / (statistics.median(prefill) / 1000) / 1e9,
        "context_for_cost": context, "load_seconds": run["load_seconds"],
    }
    result["notes"] = verdict(result, True) + [
        f"measured in {engine_note} in a separate process: peak_rss_mb is that process's, load included; exact "
        "zeros in the weights are not counted (nonzero_params = params)"]
    return result


def envelope(kind: str, spec: str, path: Path, threads: int, *, source: str, architecture: str,
             weights_sha256: str, info: dict[str, str], library: tuple[str, str]) -> dict[str, Any]:
    """The result header (``meta.envelope``'s fields) of a file measured in an engine."""
    from lmslim.measure.meta import libraries, machine

    libs = libraries()
    libs[library[0]] = library[1]
    mach = machine("cpu")
    mach["engine_threads"] = threads
    return {"kind": kind, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"spec": spec, "source": source, "path": str(path), "weights_sha256": weights_sha256,
                      "architecture": architecture},
            "machine": mach, "libraries": libs, "engine": info}
