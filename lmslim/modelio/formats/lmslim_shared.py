"""lmslim's layer-shared format (``lmslim_sharing`` in config.json): each shared tensor stored once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmslim.core.errors import UserError
from lmslim.modelio.formats import ModelFormat, register_format, save_config_and_tokenizer, unique_state_dict
from lmslim.nn.sharing import apply_sharing


def save_shared(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a shared model into ``folder`` (existing, empty): each shared tensor stored once."""
    save_config_and_tokenizer(model, tokenizer, folder)
    save_file(unique_state_dict(model), str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def load_shared(folder: Path, config: Any, auto_class: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_shared` (or by ``save_pretrained``) with sharing restored."""
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


def _claims(model) -> bool:
    return bool(getattr(model.config, "lmslim_sharing", None))


register_format(ModelFormat("lmslim-shared", claims=_claims, save=lambda model, tokenizer, folder, dense: save_shared(model, tokenizer, folder),
                            detects=lambda config: bool(getattr(config, "lmslim_sharing", None)),
                            load=load_shared))
