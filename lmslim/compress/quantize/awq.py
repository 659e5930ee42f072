"""AWQ-style activation-aware scaling for weight-only low-bit quantization.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
https://arxiv.org/abs/2306.00978. A linear layer ``y = x Wᵀ`` is unchanged when input channel j is
divided by ``s_j`` and weight column j multiplied by it. Columns that meet large activations matter
most to the output; scaling them up before rounding gives them relatively finer steps. AWQ searches
``s = mean|x|^α`` over a grid of ``α`` in [0, 1) per group of matrices sharing one input and keeps the
``α`` with the smallest output error of the quantized layers; the division is folded into the
operation that produces the input (RMSNorm/LayerNorm weight, or ``up_proj``'s rows for ``down_proj``).

Here the output error of each candidate is computed from the input's second-moment matrix
``H = XᵀX / N`` (the one GPTQ uses) rather than by re-running the layers:
``||X Wᵀ − (X/s) Q(W·s)ᵀ||² / N = tr(Δ H Δᵀ)`` with ``Δ = W − Q(W·s)/s``. That is exact for the
layer outputs and needs no activations kept in memory. ``α = 0`` (no scaling) is on the grid, so the
chosen scales never give a larger layer error than plain RTN under this measure.

Scaled groups (Llama-style blocks): ``input_layernorm`` → q/k/v, ``post_attention_layernorm`` →
gate/up, ``up_proj`` → ``down_proj``; GPT-2: ``ln_1`` → ``c_attn``, ``ln_2`` → ``c_fc``. ``o_proj`` is
not scaled (with grouped-query attention ``v_proj`` has fewer outputs than ``o_proj`` has inputs).
Calibration is sequential (``lmslim.compress.calibration``). ``method: awq`` rounds to nearest after
scaling; ``GPTQConfig(awq=True)`` runs GPTQ on the scaled weights.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.quantize import quantize_, AWQConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> quantize_(model, AWQConfig(bits=4, group_size=32), torch.randint(10, 200, (4, 32)))["scaled_groups"]
    6
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lmslim.compress.calibration import InputStats, run_block, sequential, transformer_blocks
from lmslim.compress.quantize.api import QUANTIZERS, TargetSpec, targets_of
from lmslim.nn.quant_linear import linear_weight
from lmslim.nn.scheme import Scheme, dequantize, quantize_weight
from lmslim.compress.quantize.smoothquant import _GROUPS, _family, fold_scales_
from lmslim.core.errors import UserError
from lmslim.core.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig(TargetSpec):
    """Activation-aware scaling, then round-to-nearest.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: columns per scale (``None``: per output channel).
        symmetric: symmetric or asymmetric grid.
        minmax: asymmetric grid over each group's [min, max] instead of an integer zero point.
        grid: number of ``α`` values tried in [0, 1).
        batch_size: calibration samples per forward pass.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    minmax: bool = False
    grid: int = 20
    batch_size: int = 8
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        self._check_targets()
        Scheme(self.bits, self.group_size, self.symmetric, self.minmax)
        if self.grid < 1 or self.batch_size < 1:
            raise UserError("grid and batch_size must be >= 1")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size, self.symmetric, self.minmax)


class BlockStats:
    """Second moment ``H = XᵀX / N`` (K, K) and mean |x| (K,) of each module's input."""

    def __init__(self, mods: dict[str, nn.Module]):
        self.hessian = {n: None for n in mods}
        self.absmean = {n: None for n in mods}
        self.count = {n: 0 for n in mods}

    # (x, h, a) of the last input seen: q/k/v (and gate/up) read one tensor, so compute its moments
    # once. Holding x keeps its memory alive, so a later tensor cannot reuse the same address.
    _last: tuple | None = None

    def update(self, name: str, x: torch.Tensor) -> None:  # x: (N, K)
        last = self._last
        if (last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape
                and last[0].stride() == x.stride()):
            h, a = last[1], last[2]
        else:
            h, a = x.t() @ x, x.abs().sum(0)
            self._last = (x, h, a)
        if self.hessian[name] is None:
            self.hessian[name], self.absmean[name] = h.clone(), a.clone()
        else:
            self.hessian[name] += h
            self.absmean[name] += a
        self.count[name] += x.shape[0]

    def finish(self) -> "BlockStats":
        self._last = None
        for n, c in self.count.items():
            if self.hessian[n] is not None:
                self.hessian[n] /= max(c, 1)
                self.absmean[n] /= max(c, 1)
        return self


@torch.no_grad()
def collect_stats(block: nn.Module, mods: dict[str, nn.Module], inputs) -> BlockStats:
    """Run ``block`` on every calibration input and gather :class:`BlockStats` of ``mods``' inputs."""
    stats = BlockStats(mods)
    hooks = InputStats(mods, stats.update)
    try:
        for inp in inputs:
            run_block(block, inp)
    finally:
        hooks.remove()
    return stats.finish()


def _rtn_dq(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    if callable(scheme):  # a caller's own rounding (w -> its rounded values), e.g. a GGUF type's grid
        return scheme(w)
    q, s, o = quantize_weight(w, scheme)
    return dequantize(q, s, o, scheme.group(w.shape[1]))


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, absmean: torch.Tensor, scheme: Scheme,
                 grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The input-channel scale ``s`` (K,) for matrices sharing one input, by AWQ's ``α`` grid search.

    Args:
        weights: (out_i, K) weights that read the same input.
        hessian: (K, K) ``XᵀX / N`` of that input.
        absmean: (K,) mean |x| per input channel.

    Returns:
        ``(s, best_error, unscaled_error)``: errors are ``Σ tr(Δ H Δᵀ)`` over the matrices.
    """
    act = absmean.float().clamp(min=1e-8)
    best = (torch.ones_like(act), float("inf"))
    base = None
    for i in range(grid):
        alpha = i / grid
        s = act ** alpha
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)  # centre the scales around 1 (geometric)
        err = 0.0
        for w in weights:
            delta = w.float() - _rtn_dq(w.float() * s, scheme) / s  # (out, K)
            err += float(((delta @ hessian) * delta).sum())
        if i == 0:
            base = err
        if err < best[1]:
            best = (s, err)
    return best[0], best[1], base


def scale_plan(block: nn.Module, prefix: str, names: set[str]) -> list[tuple[nn.Module, list[str]]]:
    """(producer module, consumer full names) pairs of ``block`` whose consumers are all in ``names``."""
    fam = _family(block)
    if fam is None:
        return []
    plan = []
    for prod, cons in _GROUPS[fam]:
        full = [f"{prefix}.{c}" for c in cons]
        if all(n in names for n in full):
            plan.append((block.get_submodule(prod), full))
    return plan


@torch.no_grad()
def awq_scale_block_(block: nn.Module, prefix: str, mods: dict[str, nn.Module], stats: BlockStats,
                     scheme: Scheme, grid: int) -> list[dict]:
    """Search and fold AWQ scales into ``block`` in place; ``stats`` Hessians are updated to match.

    Scaling input channel j by ``1/s_j`` turns the consumers' ``H`` into ``H / (s sᵀ)`` exactly, and
    leaves every other module's input unchanged (the producer's change is undone by its consumers).
    """
    records = []
    for producer, names in scale_plan(block, prefix, set(mods)):
        h, a = stats.hessian[names[0]], stats.absmean[names[0]]
        if h is None:
            continue
        s, err, base = search_scale([linear_weight(mods[n]) for n in names], h, a, scheme, grid)
        fold_scales_(producer, [mods[n] for n in names], s)
        for n in names:
            stats.hessian[n] = stats.hessian[n] / (s[:, None] * s[None, :])
            stats.absmean[n] = stats.absmean[n] / s
        records.append({"consumers": names, "error": err, "unscaled_error": base})
    return records


@QUANTIZERS.register("awq", AWQConfig)
def _awq(model, config: AWQConfig, calib: torch.Tensor | None) -> dict:
    if calib is None or calib.numel() == 0:
        raise UserError("AWQ needs calibration data; none was given")
    from lmslim.compress.quantize.rtn import replace_with_quant

    targets = dict(targets_of(model, config))
    scheme = config.scheme
    records: list[dict] = []
    done: set[str] = set()

    def compress_block(path, block, mods, inputs):
        stats = collect_stats(block, mods, inputs)
        records.extend(awq_scale_block_(block, path, mods, stats, scheme, config.grid))
        for name, mod in mods.items():
            replace_with_quant(model, name, mod, scheme, config.kernel)
            done.add(name)

    _, blocks = transformer_blocks(model)
    for _ in track(sequential(model, calib, set(targets), config.batch_size, compress_block), "AWQ blocks",
                   total=len(blocks)):
        pass
    leftovers = [n for n in targets if n not in done]
    for name in leftovers:  # e.g. a quantized LM head: no block input to scale against
        replace_with_quant(model, name, targets[name], scheme, config.kernel)
    if not records:
        log.warning("AWQ: no scalable (norm/linear -> linear) groups in %s; plain RTN", type(model).__name__)
    gain = [r["error"] / r["unscaled_error"] for r in records if r["unscaled_error"] > 0]
    return {"calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
            "scaled_groups": len(records), "error_ratio_mean": sum(gain) / max(len(gain), 1),
            "rtn_modules": leftovers}
