"""ALBERT-style cross-layer parameter sharing: one set of block weights serves a group of layers.

Lan et al. 2019, "ALBERT: A Lite BERT for Self-supervised Learning of Language Representations",
https://arxiv.org/abs/1909.11942

Consecutive blocks are grouped (``group_size`` G); inside a group every block uses the *same*
``nn.Parameter`` objects, initialised from the mean of the group's weights or from one chosen layer.
Norm weights can stay per layer (``keep_norms``: they are tiny and carry much of each layer's
identity). The model keeps its depth, so **FLOPs and activation memory do not drop**: sharing cuts
the number of stored parameters (and the file size), not compute. Decode still reads the shared
weights once per layer that uses them, so the memory-bandwidth bound barely moves either unless a
group's weights stay in cache. Quality drops until the model is re-trained; recover it with
distillation from the unshared model (``lmslim distill --teacher ORIGINAL --student SHARED``).

Saved form: a normal HF folder whose ``model.safetensors`` stores each shared tensor once (under the
name of the group's first layer) and whose ``config.json`` carries an ``lmslim_sharing`` record
(groups and the shared parameter names); :func:`lmslim.modelio.load_model` rebuilds the sharing on load.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.share import ShareConfig, share_
    >>> model, _ = build_tiny("tiny-llama")
    >>> report = share_(model, ShareConfig(group_size=2))
    >>> report["params_after"] < report["params_before"]
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lmslim.core.configs import check_fields
from lmslim.core.errors import UserError
from lmslim.core.registry import Registry
from lmslim.nn.blocks import transformer_blocks
from lmslim.nn.sharing import SHARING_FORMAT, declare_ties, tie_groups, unique_bytes, unique_params

SHARERS = Registry("sharing")
INITS = ("mean", "first", "index")


@dataclass(frozen=True)
class ShareConfig:
    """Cross-layer sharing.

    Attributes:
        group_size: consecutive layers per shared set of weights (≥ 2; a shorter last group is allowed).
        init: ``mean`` of the group's weights, ``first`` layer of the group, or ``index`` (layer
            ``index`` within each group, clamped to the group's length).
        index: position inside each group for ``init="index"``.
        keep_norms: keep each layer's own norm weights (not shared).
    """

    group_size: int = 2
    init: str = "mean"
    index: int = 0
    keep_norms: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.group_size < 2:
            raise UserError(f"--group-size must be an integer >= 2 (layers per shared group), got {self.group_size}")
        if self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0 <= self.index < self.group_size:
            raise UserError(f"--index must be in [0, group size {self.group_size}), got {self.index}")


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm and the model-specific copies (LlamaRMSNorm, …) all carry "Norm" in the class name.
    return "Norm" in type(module).__name__


def _shareable_names(block: nn.Module, keep_norms: bool) -> list[str]:
    names = []
    for mod_name, mod in block.named_modules():
        if keep_norms and _is_norm(mod):
            continue
        for p_name, _ in mod.named_parameters(recurse=False):
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def share_(model: nn.Module, config: ShareConfig) -> dict[str, Any]:
    """Share block weights across groups of consecutive layers, in place.

    Args:
        model: a transformers model with a list of blocks (Llama, GPT-2, BERT, …); not quantized.
        config: the :class:`ShareConfig`.

    Returns:
        A report: groups, shared parameter names per block, unique parameters and bytes before/after,
        and a note that FLOPs do not change.

    Raises:
        UserError: quantized model, already shared model, or fewer layers than the group size.
    """
    if getattr(model.config, "lmslim_quantization", None):
        raise UserError("the model is quantized; share layers of the full-precision model, then quantize")
    if getattr(model.config, "lmslim_sharing", None):
        raise UserError("the model already shares layers; start from the unshared model")
    path, blocks = transformer_blocks(model)
    n = len(blocks)
    if n < config.group_size:
        raise UserError(f"the model has {n} layers, fewer than --group-size {config.group_size}")
    params_before, bytes_before = unique_params(model), unique_bytes(model)
    groups = [list(range(i, min(i + config.group_size, n))) for i in range(0, n, config.group_size)]
    names = _shareable_names(blocks[0], config.keep_norms)
    tie_groups(blocks, groups, names, config.init, config.index)
    model.config.lmslim_sharing = {"format": SHARING_FORMAT, "blocks": path, "groups": groups, "params": names,
                                   "config": asdict(config)}
    declare_ties(model, model.config.lmslim_sharing)
    return {"method": "share", "groups": groups, "shared_per_block": len(names), "params_before": params_before,
            "params_after": unique_params(model), "bytes_before": bytes_before, "bytes_after": unique_bytes(model),
            "note": "FLOPs per token are unchanged: every layer still runs; only stored parameters drop"}


SHARERS.register("share", ShareConfig)(share_)
