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
    include_lm_head: bool = False  # the LM head stays fp32 unless asked
    include_embeddings: bool = False  # the input embedding table too (RTN on the method's grid; see below)
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


def lm_head_is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)


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
    tied = lm_head_is_tied(model)
    if getattr(config, "include_lm_head", False) and not (tied and config.include_embeddings):
        untie_lm_head(model)
    t0 = time.perf_counter()
    report = handler(model, config, calib)
    embeddings = quantize_embedding_(model, config, tied) if getattr(config, "include_embeddings", False) else {}
    report = {"method": name, "seconds": time.perf_counter() - t0, **report}
    tied_heads = {e["tied_head"] for e in embeddings.values() if e["tied_head"]}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in tied_heads}
    model.config.lmslim_quantization = {
        "format": 2,  # 2: fp16 scale + offset (1: fp32 scale + uint8 zero point)
        "method": name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "modules": {n: {"in": m.in_features, "out": m.out_features, **m.scheme.record(),
                        "bias": m.bias is not None, "kernel": m.kernel} for n, m in modules.items()},
    }
    if embeddings:
        model.config.lmslim_quantization["embeddings"] = embeddings
    report["modules"] = len(modules) + len(embeddings) + len(tied_heads)
    report["kernels"] = sorted({m.kernel for m in modules.values()})
    return report


def quantize_embedding_(model: nn.Module, config: Any, tied: bool) -> dict[str, dict[str, Any]]:
    """Swap the input embedding for a ``QuantEmbedding`` on the method's weight grid; its record entry.

    An untied table is rounded to nearest (there is no input activation to calibrate a lookup on). A
    table the LM head shares is one matrix: when the method quantized the head (``include_lm_head``:
    GPTQ/AWQ calibrate it as a matmul), the table takes the head's codes; otherwise the table is
    rounded and the head becomes a ``QuantLinear`` reading the same codes. Either way it is stored once.
    """
    from lmslim.core.targeting import set_submodule
    from lmslim.nn.quant_embedding import QuantEmbedding
    from lmslim.nn.scheme import Scheme, quantize_weight

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names.get(id(head))
    if type(emb) is not nn.Embedding:
        raise UserError(f"include_embeddings quantizes an nn.Embedding table; this model's is {type(emb).__name__}")
    scheme = getattr(config, "scheme", None) or Scheme(8, None, True)  # dynamic int8: per-row symmetric int8
    if tied and isinstance(head, QuantLinear):
        qemb = QuantEmbedding.from_packed(head.qweight, (head.out_features, head.in_features), head.scale,
                                          head.offset, head.scheme, emb.padding_idx)
        qemb.tie(head)
    else:
        codes, scale, offset = quantize_weight(emb.weight.data, scheme, getattr(config, "clip_search", False))
        qemb = QuantEmbedding.from_codes(codes, scale, offset, scheme, emb.padding_idx)
        if tied:
            head = QuantLinear(qemb.in_features, qemb.out_features, scheme, False, resolve_kernel(config.kernel))
            qemb.tie(head)
            set_submodule(model, head_name, head)
    set_submodule(model, names[id(emb)], qemb)
    return {names[id(emb)]: {"in": qemb.in_features, "out": qemb.out_features, **qemb.scheme.record(),
                             "padding_idx": qemb.padding_idx,
                             "tied_head": head_name if tied else None,
                             "head_kernel": head.kernel if tied else None}}
