"""Cost measurement on the device: latency, throughput, memory, size, and the physical bound.

Prefill: one forward pass over ``batch × prompt_len`` tokens, repeated; p50/p95 reported.
Decode: greedy, KV cache, exactly ``gen_len`` steps after the prefill (no early stop at EOS), so
every model does the same work; tokens/s is ``batch · gen_len / decode time`` (prefill excluded).
Every measurement is preceded by warm-up runs; medians are reported. Prompts are seeded random
token ids (latency does not depend on the text).

The bound: decode must read every weight once per step, so it cannot beat
``bandwidth / bytes_read_per_token``, with the read bandwidth measured in the same process.

Example:
    >>> from lmslim.modelio import load_model
    >>> from lmslim.measure.bench import BenchConfig, bench
    >>> lm = load_model("builtin:tiny-llama")
    >>> r = bench(lm, BenchConfig(prompt_len=8, gen_len=4, repeats=2, warmup=1))
    >>> r["decode_tokens_per_s"] > 0
    True
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from lmslim.core.errors import UserError
from lmslim.core.progress import track
from lmslim.measure import cost


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 64
    repeats: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "gen_len", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_bandwidth(mb: int = 256, repeats: int = 10) -> float:
    """Memory read bandwidth in GB/s: best of ``repeats`` full reductions over an ``mb`` MiB buffer."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(vocab: int, cfg: BenchConfig, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # Skip the lowest ids, where tokenizers keep their special tokens.
    return torch.randint(min(16, vocab - 1), vocab, (cfg.batch, cfg.prompt_len), generator=gen).to(device)


@torch.no_grad()
def _time_prefill(model, ids: torch.Tensor, cfg: BenchConfig, use_cache: bool) -> list[float]:
    device = ids.device
    times = []
    for i in track(range(cfg.warmup + cfg.repeats), "prefill", total=cfg.warmup + cfg.repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=use_cache) if use_cache else model(input_ids=ids)
        _sync(device)
        if i >= cfg.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return times


@torch.no_grad()
def _time_decode(model, ids: torch.Tensor, cfg: BenchConfig) -> tuple[list[float], list[float]]:
    """Per-run decode tokens/s and per-step latencies (ms) over the measured runs."""
    device = ids.device
    rates, steps_ms = [], []
    for i in track(range(cfg.warmup + cfg.repeats), "decode", total=cfg.warmup + cfg.repeats):
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg.gen_len):
            s0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            if i >= cfg.warmup:
                steps_ms.append((time.perf_counter() - s0) * 1000)
        if i >= cfg.warmup:
            rates.append(cfg.batch * cfg.gen_len / (time.perf_counter() - t0))
    return rates, steps_ms


def bench(loaded, cfg: BenchConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measure one loaded model; returns the flat metrics dict (see module docstring)."""
    model = loaded.model
    device = torch.device(device)
    shape = cost.shape_of(model)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    causal = loaded.task == "clm"
    total_len = cfg.prompt_len + (cfg.gen_len if causal else 0)
    if limit and total_len > limit:
        raise UserError(f"prompt-len + gen-len = {total_len} exceeds the model's {limit} positions")
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = _prompt(vocab, cfg, device)

    prefill = _time_prefill(model, ids, cfg, use_cache=causal)
    result: dict[str, Any] = {
        "prefill_ms_p50": statistics.median(prefill),
        "prefill_ms_p95": percentile(prefill, 95),
        "prefill_tokens_per_s": cfg.batch * cfg.prompt_len / (statistics.median(prefill) / 1000),
    }
    context = cfg.prompt_len + cfg.gen_len // 2  # mean context during decode
    bandwidth = measure_bandwidth()
    if causal:
        rates, steps = _time_decode(model, ids, cfg)
        result.update({
            "decode_tokens_per_s": statistics.median(rates),
            "decode_ms_per_token_p50": statistics.median(steps),
            "decode_ms_per_token_p95": percentile(steps, 95),
        })
    else:
        result.update({"decode_tokens_per_s": None, "decode_ms_per_token_p50": None, "decode_ms_per_token_p95": None})
    bytes_tok = cost.bytes_read_per_token(shape, context)
    bound = bandwidth * 1e9 / bytes_tok * cfg.batch
    result.update({
        "peak_rss_mb": peak_rss_mb(),
        "size_mb": loaded.resolved.size_bytes() / 1e6,
        "params": shape.params,
        "nonzero_params": shape.nonzero_params,
        "flops_per_token": cost.flops_per_token(shape, context),
        "prefill_flops": cost.forward_flops(shape, cfg.prompt_len, cfg.batch),
        "train_flops_per_token": cost.training_flops_per_token(shape, cfg.prompt_len),
        "bytes_read_per_token": bytes_tok,
        "bandwidth_gbs": bandwidth,
        "decode_bound_tokens_per_s": bound if causal else None,
        "fraction_of_bound": (result["decode_tokens_per_s"] / bound) if causal else None,
        "prefill_gflops_per_s": cost.forward_flops(shape, cfg.prompt_len, cfg.batch)
        / (statistics.median(prefill) / 1000) / 1e9,
        "context_for_cost": context,
    })
    kernels = sorted({m.kernel for m in model.modules() if hasattr(m, "kernel") and hasattr(m, "cost_profile")})
    quant = getattr(model.config, "lmslim_quantization", None)
    if quant:
        result["quantization"] = {"method": quant.get("method"), "kernels": kernels,
                                  "bits": sorted({m["bits"] for m in quant.get("modules", {}).values()})}
    pruning = getattr(model.config, "lmslim_pruning", None)
    if pruning:
        result["pruning"] = {"methods": [s.get("method") for s in pruning.get("steps", [])], "n_m": pruning.get("n_m")}
    result["notes"] = verdict(result, causal) + kernel_notes(kernels)
    return result


def kernel_notes(kernels: list[str]) -> list[str]:
    notes = []
    if "dequant" in kernels:
        notes.append("some layers dequantize their integer weights on every call (no integer kernel used): "
                     "smaller on disk, but expect them to run slower than fp32 on this device")
    if "int8" in kernels or "fbgemm" in kernels:
        notes.append("integer layers run as W8A8 int8 GEMMs with per-token activation quantization; "
                     "compare decode/prefill against the fp32 model measured in the same run to see the real speedup")
    return notes


def verdict(r: dict[str, Any], causal: bool) -> list[str]:
    """Plain statements about what limits this model's speed on this device."""
    notes = []
    if not causal:
        notes.append("encoder model: no autoregressive decode; prefill is a full forward pass")
        return notes
    frac = r["fraction_of_bound"]
    if frac < 0.5:
        notes.append(f"decode reaches {frac:.0%} of the memory-bandwidth bound "
                     f"({r['decode_bound_tokens_per_s']:.0f} tok/s): per-token compute and framework overhead, "
                     "not weight reads, limit decode speed here")
    else:
        notes.append(f"decode reaches {frac:.0%} of the memory-bandwidth bound: fewer bytes per token "
                     "(quantization, structured pruning) is what makes it faster")
    n_m = (r.get("pruning") or {}).get("n_m")
    if n_m:
        # lmslim runs N:M weights with dense kernels: no semi-structured sparse kernel exists on CPU.
        notes.append(f"weights follow a {n_m} sparsity pattern, but they run on dense kernels here (no sparse "
                     f"{n_m} kernel is used): no speedup on this device; only its smaller compressed file")
    elif r["nonzero_params"] < 0.95 * r["params"]:
        notes.append(f"{1 - r['nonzero_params'] / r['params']:.0%} of weights are zero, but dense kernels still "
                     "read and multiply them: no speedup on this device from unstructured sparsity")
    return notes
