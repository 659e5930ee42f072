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
(groups and the shared parameter names); :func:`load_shared` rebuilds the sharing on load.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmslim.compress.calibration import transformer_blocks
from lmslim.core.configs import check_fields
from lmslim.core.errors import UserError
from lmslim.core.registry import Registry

SHARERS = Registry("sharing")
INITS = ("mean", "first", "index")
FORMAT = 1


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


def _set_param(block: nn.Module, name: str, param: nn.Parameter) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = block.get_submodule(mod_name) if mod_name else block
    setattr(mod, leaf, param)


def unique_params(model: nn.Module) -> int:
    """Parameters stored once, however many modules use them."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def unique_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _tie(blocks: nn.ModuleList, groups: list[list[int]], names: list[str], init: str | None, index: int) -> None:
    for group in groups:
        if len(group) < 2:
            continue
        for name in names:
            members = [blocks[i].get_parameter(name) for i in group]
            if init is None:  # loading: the values come from the file afterwards
                shared = members[0]
            else:
                with torch.no_grad():
                    if init == "mean":
                        data = torch.stack([m.detach() for m in members]).mean(0)
                    else:
                        data = members[0 if init == "first" else min(index, len(group) - 1)].detach().clone()
                shared = nn.Parameter(data.to(members[0].dtype), requires_grad=members[0].requires_grad)
            for i in group:
                _set_param(blocks[i], name, shared)


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
    _tie(blocks, groups, names, config.init, config.index)
    model.config.lmslim_sharing = {"format": FORMAT, "blocks": path, "groups": groups, "params": names,
                                   "config": asdict(config)}
    _declare_ties(model, model.config.lmslim_sharing)
    return {"method": "share", "groups": groups, "shared_per_block": len(names), "params_before": params_before,
            "params_after": unique_params(model), "bytes_before": bytes_before, "bytes_after": unique_bytes(model),
            "note": "FLOPs per token are unchanged: every layer still runs; only stored parameters drop"}


SHARERS.register("share", ShareConfig)(share_)


def apply_sharing(model: nn.Module, record: dict[str, Any]) -> None:
    """Re-create the sharing described by a saved ``lmslim_sharing`` record (values loaded afterwards)."""
    if record.get("format") != FORMAT:
        raise UserError(f"layer-sharing format {record.get('format')} is not supported by this lmslim")
    _, blocks = transformer_blocks(model)
    groups = [list(g) for g in record["groups"]]
    if max((i for g in groups for i in g), default=-1) >= len(blocks):
        raise UserError("the layer-sharing record names more layers than the model has; re-export the model")
    _tie(blocks, groups, list(record["params"]), None, 0)
    _declare_ties(model, record)


def _declare_ties(model: nn.Module, record: dict[str, Any]) -> None:
    """Tell transformers which tensors are aliases, so ``save_pretrained`` (e.g. in the training loop)
    stores each shared tensor once instead of refusing to save shared tensors."""
    keys = dict(getattr(type(model), "_tied_weights_keys", None) or {})
    for group in record["groups"]:
        for i in group[1:]:
            for name in record["params"]:
                keys[f"{record['blocks']}.{i}.{name}"] = f"{record['blocks']}.{group[0]}.{name}"
    model._tied_weights_keys = keys
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)


def save_shared(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a shared model into ``folder`` (existing, empty): each shared tensor stored once."""
    from safetensors.torch import save_file

    from lmslim.compress.quantize.serialize import unique_state_dict

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    save_file(unique_state_dict(model), str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def load_shared(folder: Path, config: Any, auto_class: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_shared` (or by ``save_pretrained``) with sharing restored."""
    from safetensors.torch import load_file

    model = auto_class.from_config(config, dtype=dtype)
    apply_sharing(model, config.lmslim_sharing)
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Names missing from the file are fine when they alias a loaded tensor (shared or tied).
    loaded = {model.get_parameter(k).data_ptr() for k in state if _is_param(model, k)}
    missing = [k for k in missing if not k.endswith("inv_freq")
               and not (_is_param(model, k) and model.get_parameter(k).data_ptr() in loaded)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not match the recorded layer sharing "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False
