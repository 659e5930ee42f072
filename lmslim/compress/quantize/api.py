"""One in-place entry point for every quantization method: ``quantize_(model, Config(...))``.

Each method is a frozen config dataclass (validated in ``__post_init__``) plus a handler registered
under the method's name in ``QUANTIZERS``; the CLI and recipes look methods up by that name.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.quantize import quantize_, RTNConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> report = quantize_(model, RTNConfig(bits=4, group_size=32))
    >>> report["modules"]
    14
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmslim.nn.quant_linear import KERNELS, QuantLinear
from lmslim.core.configs import check_fields, check_patterns, show
from lmslim.core.errors import UserError
from lmslim.core.registry import Registry
from lmslim.core.targeting import select_linears

QUANTIZERS = Registry("quantization")


@dataclass(frozen=True)
class TargetSpec:
    """Which matrices a method quantizes (shared by every method's config)."""

    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    include_lm_head: bool = False  # embeddings and the LM head stay fp32 unless asked
    kernel: str = "auto"  # auto | dequant | int8 | fbgemm (see linear.py)

    def _check_targets(self) -> None:
        check_fields(self)  # types first: every rule below (and in the subclasses) may trust them
        if self.kernel not in ("auto",) + KERNELS:
            raise UserError(f"unknown kernel {show(self.kernel)}; choose auto, {', '.join(KERNELS)}")
        check_patterns(self.targets, "targets")
        check_patterns(self.ignore, "ignore")


def resolve_kernel(kernel: str) -> str:
    """``auto`` picks the faster int8 kernel as measured on this machine (``lmslim.nn.kernel_probe``);
    the choice is recorded per module in the saved folder."""
    if kernel != "auto":
        return kernel
    from lmslim.nn.kernel_probe import fastest_int8_kernel

    return fastest_int8_kernel()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def targets_of(model: nn.Module, cfg: TargetSpec) -> list[tuple[str, nn.Module]]:
    found = list(select_linears(model, cfg.targets, cfg.ignore, cfg.include_lm_head))
    if not found:
        raise UserError("no eligible layers: no Linear/Conv1D module matches the targets "
                        f"{list(cfg.targets)} outside ignore {list(cfg.ignore)}")
    return found


def untie_lm_head(model: nn.Module) -> None:
    """Give the LM head its own weight so it can be quantized apart from the input embedding."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def quantize_(model: nn.Module, config: Any, calib: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place with the method ``config`` names.

    Args:
        model: a transformers model (fp32 weights).
        config: a registered method config (``RTNConfig``, ``DynamicInt8Config``, ``GPTQConfig``,
            ``SmoothQuantConfig``).
        calib: (n_samples, seq_len) token ids for methods that calibrate (see ``lmslim.data.calib``).

    Returns:
        A report: method name, modules quantized, seconds, and method-specific figures.
    """
    if is_quantized(model):
        raise UserError("the model is already quantized; start from the full-precision model")
    name, handler = QUANTIZERS.handler_for(config)
    if getattr(config, "needs_calibration", False) and calib is None:
        raise UserError(f"{name} needs calibration data (--calib SPEC)")
    if getattr(config, "include_lm_head", False):
        untie_lm_head(model)
    t0 = time.perf_counter()
    report = handler(model, config, calib)
    report = {"method": name, "seconds": time.perf_counter() - t0, **report}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    model.config.lmslim_quantization = {
        "format": 2,  # 2: fp16 scale + offset (1: fp32 scale + uint8 zero point)
        "method": name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "modules": {n: {"in": m.in_features, "out": m.out_features, "bits": m.scheme.bits,
                        "group_size": m.scheme.group_size, "symmetric": m.scheme.symmetric,
                        "minmax": m.scheme.minmax,
                        "bias": m.bias is not None, "kernel": m.kernel} for n, m in modules.items()},
    }
    report["modules"] = len(modules)
    report["kernels"] = sorted({m.kernel for m in modules.values()})
    return report
