"""Cross-layer parameter sharing: several blocks holding the very same ``nn.Parameter``.

The ``lmslim_sharing`` record (``{"format": 1, "blocks": path, "groups": [[0, 1], ...], "params":
[names inside a block]}``) says which blocks share which parameters; a loader re-creates the ties
before reading the stored values, so each shared tensor is stored once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.nn.blocks import transformer_blocks

SHARING_FORMAT = 1


def set_param(block: nn.Module, name: str, param: nn.Parameter) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = block.get_submodule(mod_name) if mod_name else block
    setattr(mod, leaf, param)


def unique_params(model: nn.Module) -> int:
    """Parameters stored once, however many modules use them."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def unique_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def tie_groups(blocks: nn.ModuleList, groups: list[list[int]], names: list[str], init: str | None, index: int) -> None:
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
                set_param(blocks[i], name, shared)


def apply_sharing(model: nn.Module, record: dict[str, Any]) -> None:
    """Re-create the sharing described by a saved ``lmslim_sharing`` record (values loaded afterwards)."""
    if record.get("format") != SHARING_FORMAT:
        raise UserError(f"layer-sharing format {record.get('format')} is not supported by this lmslim")
    _, blocks = transformer_blocks(model)
    groups = [list(g) for g in record["groups"]]
    if max((i for g in groups for i in g), default=-1) >= len(blocks):
        raise UserError("the layer-sharing record names more layers than the model has; re-export the model")
    tie_groups(blocks, groups, list(record["params"]), None, 0)
    declare_ties(model, record)


def declare_ties(model: nn.Module, record: dict[str, Any]) -> None:
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
