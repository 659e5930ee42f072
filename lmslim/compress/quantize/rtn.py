"""Round-to-nearest weight quantization (int8 per channel, int2/3/4/8 group-wise) and dynamic int8.

RTN rounds each weight to the nearest code of its (row, group) grid; no data needed.
``DynamicInt8Config`` is int8 symmetric per-output-channel weights run by an int8 GEMM with activations
quantized per token at run time (W8A8); it covers ``nn.Linear`` and GPT-2's ``Conv1D``.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.quantize import quantize_, DynamicInt8Config
    >>> model, _ = build_tiny("tiny-gpt2")
    >>> quantize_(model, DynamicInt8Config())["modules"]  # GPT-2's Conv1D layers included
    8
"""

from __future__ import annotations

from dataclasses import dataclass

from lmslim.compress.quantize.api import QUANTIZERS, TargetSpec, resolve_kernel, targets_of
from lmslim.nn.quant_linear import QuantLinear, linear_weight
from lmslim.nn.scheme import Scheme, quantize_weight
from lmslim.core.errors import UserError
from lmslim.core.targeting import set_submodule


@dataclass(frozen=True)
class RTNConfig(TargetSpec):
    """Weight-only round-to-nearest.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: columns per scale; ``None`` for one scale per output channel. A group size that
            does not divide the input width leaves a shorter last group (see ``scheme.py``).
        symmetric: grid centred on zero (True) or asymmetric (False).
        minmax: asymmetric grid spanning each group's [min, max] (Q4_1) instead of an integer zero point.
        signed_scale: symmetric grid on ggml's Q4_0/Q8_0 rule (all 2^bits codes; see ``scheme.py``).
        clip_search: shrink each group's range where that lowers its squared rounding error
            (``scheme.search_params``); off: the plain full-range grid.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    minmax: bool = False
    signed_scale: bool = False
    clip_search: bool = False

    def __post_init__(self) -> None:
        self._check_targets()
        self.scheme  # validates bits, group size and the grid rule

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size, self.symmetric, self.minmax, self.signed_scale)


@dataclass(frozen=True)
class DynamicInt8Config(TargetSpec):
    """int8 per-channel symmetric weights, int8 per-token activations computed at run time."""

    kernel: str = "auto"  # the faster of int8 / fbgemm, measured (lmslim.nn.kernel_probe)

    def __post_init__(self) -> None:
        self._check_targets()
        if self.kernel not in ("auto", "int8", "fbgemm"):
            raise UserError(f"dynamic int8 runs on an int8 kernel (int8 or fbgemm), not {self.kernel!r}")


def replace_with_quant(model, name: str, module, scheme: Scheme, kernel: str, weight=None,
                       clip_search: bool = False) -> QuantLinear:
    """Swap ``module`` for a QuantLinear holding RTN codes of ``weight`` (default: its own weight)."""
    w = linear_weight(module) if weight is None else weight
    codes, scale, offset = quantize_weight(w, scheme, clip_search)
    bias = module.bias.data if getattr(module, "bias", None) is not None else None
    q = QuantLinear.from_codes(codes, scale, offset, scheme, bias, resolve_kernel(kernel))
    set_submodule(model, name, q)
    return q


def replace_all(model, targets: dict, scheme: Scheme, kernel: str, clip_search: bool = False) -> None:
    """RTN every module of ``targets`` (name -> module): on a streamed model each block while it is loaded."""
    from lmslim.compress.calibration import block_stream, each_block

    targets = dict(targets)
    if block_stream(model) is not None:
        for _path, _block, mods in each_block(model, set(targets)):
            for name, module in mods.items():
                replace_with_quant(model, name, module, scheme, kernel, clip_search=clip_search)
                del targets[name]
    for name, module in targets.items():  # everything (in memory), or what lies outside the blocks
        replace_with_quant(model, name, module, scheme, kernel, clip_search=clip_search)


@QUANTIZERS.register("rtn", RTNConfig)
def _rtn(model, config: RTNConfig, calib=None) -> dict:
    replace_all(model, dict(targets_of(model, config)), config.scheme, config.kernel, config.clip_search)
    return {}


INT8_PER_CHANNEL = Scheme(bits=8, group_size=None, symmetric=True)  # dynamic int8's (and SmoothQuant's) grid


@QUANTIZERS.register("dynamic-int8", DynamicInt8Config)
def dynamic_int8(model, config: DynamicInt8Config, calib=None) -> dict:
    """Swap every targeted matrix for int8 per-channel weights on an int8 kernel."""
    replace_all(model, dict(targets_of(model, config)), INT8_PER_CHANNEL, config.kernel)
    return {}
