"""SmoothQuant: move activation outliers into the weights, then W8A8.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", https://arxiv.org/abs/2211.10438. For a linear layer ``y = x W`` the input channel j can be
divided by ``s_j`` and the weight's row j multiplied by it without changing ``y``. With
``s_j = max|X_j|^α / max|W_j|^(1-α)`` the activation outlier channels shrink and the weights absorb
them, so both quantize well at 8 bits. The division is folded into the operation that produces x:

- Llama-style blocks: ``input_layernorm`` → q/k/v, ``post_attention_layernorm`` → gate/up, and
  ``up_proj`` → ``down_proj`` (the MLP's input to ``down_proj`` is linear in ``up_proj``'s output);
- GPT-2 blocks: ``ln_1`` → ``attn.c_attn`` and ``ln_2`` → ``mlp.c_fc``.

The smoothed model is then quantized like ``dynamic-int8`` (per-token activations, int8 weights).
Statistics, smoothing and quantization go block by block, so a streamed model (``--stream``) gets
exactly the codes the model in memory gets.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.quantize import quantize_, SmoothQuantConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> quantize_(model, SmoothQuantConfig(alpha=0.5), torch.randint(10, 200, (4, 32)))["smoothed_groups"]
    6
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lmslim.compress.calibration import InputStats, sequential
from lmslim.compress.quantize.api import QUANTIZERS, TargetSpec, targets_of
from lmslim.compress.quantize.rtn import INT8_PER_CHANNEL, replace_with_quant
from lmslim.core.errors import UserError

log = logging.getLogger(__name__)

# (producer, consumers) inside one block, by relative module name.
_GROUPS = {
    "llama": [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
              ("mlp.up_proj", ("mlp.down_proj",))],
    "gpt2": [("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))],
}


@dataclass(frozen=True)
class SmoothQuantConfig(TargetSpec):
    """Smoothing strength ``alpha`` in [0, 1] (0: no migration; 0.5 is the paper's default)."""

    alpha: float = 0.5
    batch_size: int = 8
    kernel: str = "int8"
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        self._check_targets()
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"


def _in_weight_view(m: nn.Module) -> torch.Tensor:
    """The weight with input channels on the last dim: (out, in)."""
    return m.weight.data.t() if _is_conv1d(m) else m.weight.data


@torch.no_grad()
def smooth_(producer: nn.Module, consumers: list[nn.Module], act_max: torch.Tensor, alpha: float) -> None:
    """Fold ``s = max|X|^α / max|W|^(1-α)`` into ``producer`` (÷) and ``consumers`` (×)."""
    w_max = torch.stack([_in_weight_view(c).abs().amax(0) for c in consumers]).amax(0)  # (in,)
    s = (act_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    fold_scales_(producer, consumers, s)


@torch.no_grad()
def fold_scales_(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s`` (in,) and multiply ``consumers``' input channels by it.

    The product is unchanged: the producer is a norm (``y = weight * norm(x) (+ bias)``) or a linear
    whose output feeds the consumers linearly (``up_proj`` -> ``down_proj`` through ``act(gate) * up``).
    """
    if isinstance(producer, nn.Linear) or _is_conv1d(producer):  # e.g. up_proj: scale its output rows
        if _is_conv1d(producer):
            producer.weight.data.div_(s.unsqueeze(0))
        else:
            producer.weight.data.div_(s.unsqueeze(1))
    else:  # a norm: y = weight * norm(x) (+ bias)
        producer.weight.data.div_(s)
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(s)
    for c in consumers:
        if _is_conv1d(c):
            c.weight.data.mul_(s.unsqueeze(1))  # Conv1D weight is (in, out)
        else:
            c.weight.data.mul_(s.unsqueeze(0))


def _family(block: nn.Module) -> str | None:
    names = {n for n, _ in block.named_modules()}
    for fam, groups in _GROUPS.items():
        if all(p in names and all(c in names for c in cs) for p, cs in groups):
            return fam
    return None


def _block_groups(block: nn.Module, block_path: str, targets: dict[str, nn.Module]) -> list[tuple]:
    """``(producer, [consumers], consumer full names)`` of one block whose consumers are all targets."""
    fam = _family(block)
    groups = []
    for prod, cons in _GROUPS.get(fam, ()):
        names = [f"{block_path}.{c}" for c in cons]
        if all(n in targets for n in names):
            groups.append((block.get_submodule(prod), [block.get_submodule(c) for c in cons], names))
    return groups


@QUANTIZERS.register("smoothquant", SmoothQuantConfig)
def _smoothquant(model, config: SmoothQuantConfig, calib: torch.Tensor | None) -> dict:
    """Block by block (``lmslim.compress.calibration.sequential``, so a streamed model gives the same result).

    Hooks on each group's first consumer record max |x| while the driver runs the block's float
    weights to make the next block's inputs; then the block is smoothed and quantized. Every block is
    therefore calibrated on float activations, as in the paper's one-pass statistics.
    """
    if calib is None or calib.numel() == 0:
        raise UserError("SmoothQuant needs calibration data; none was given")
    targets = dict(targets_of(model, config))
    pending: dict[str, tuple[list, dict, InputStats]] = {}
    smoothed = 0

    def update(maxima: dict):
        def fn(name: str, x: torch.Tensor) -> None:  # x: (N, K)
            m = x.abs().amax(0)
            maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m
        return fn

    def watch(block_path, block, mods, _inputs) -> None:  # before the block runs: hooks only
        groups, maxima = _block_groups(block, block_path, targets), {}
        firsts = {names[0]: consumers[0] for _, consumers, names in groups}
        pending[block_path] = (groups, maxima, InputStats(firsts, update(maxima)))

    def compress(block_path, block, mods) -> None:  # after it ran: smooth, then int8
        nonlocal smoothed
        groups, maxima, stats = pending.pop(block_path)
        stats.remove()
        for producer, consumers, names in groups:
            smooth_(producer, consumers, maxima[names[0]], config.alpha)
        smoothed += len(groups)
        for name, module in mods.items():
            replace_with_quant(model, name, module, INT8_PER_CHANNEL, config.kernel)
            del targets[name]

    for _ in sequential(model, calib, set(targets), config.batch_size, watch, after_block=compress):
        pass
    for name, module in targets.items():  # outside the blocks (an LM head): quantized without smoothing
        replace_with_quant(model, name, module, INT8_PER_CHANNEL, config.kernel)
    if not smoothed:
        log.warning("SmoothQuant: no smoothable (norm/linear -> linear) pairs in %s; quantized without smoothing",
                    type(model).__name__)
    return {"smoothed_groups": smoothed, "alpha": config.alpha,
            "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}}
