"""lmslim's layer-shared format (``lmslim_sharing`` in config.json): each shared tensor stored once.

Only lmslim reads it: the folder refuses plain transformers (``lmslim_only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmslim.core.errors import UserError
from lmslim.modelio.formats import ModelFormat, register_format, save_config_and_tokenizer, unique_state_dict
from lmslim.modelio.formats.lmslim_only import mark_lmslim_only
from lmslim.modelio.formats.meta_load import empty_model, fill, stored_tensors
from lmslim.nn.sharing import apply_sharing
from lmslim.nn.structure import apply_structure


REASON = "cross-layer weight sharing"


def save_shared(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a shared model into ``folder`` (existing, empty): each shared tensor stored once.

    No standard layout stores one tensor for several layers, and plain transformers would initialise
    the missing aliases at random, so the folder refuses it (``lmslim_only``).
    """
    save_config_and_tokenizer(model, tokenizer, folder)
    save_file(unique_state_dict(model), str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    mark_lmslim_only(folder, REASON)


def load_shared(folder: Path, config: Any, auto_class: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_shared` (or by ``save_pretrained``) with sharing restored."""
    structure = getattr(config, "lmslim_structure", None)
    model = empty_model(auto_class, config, (lambda m: apply_structure(m, structure)) if structure else None)
    state = dict(stored_tensors(folder))
    return fill(model, state, folder, dtype=dtype, retie=lambda m: apply_sharing(m, config.lmslim_sharing))


def _claims(model) -> bool:
    return bool(getattr(model.config, "lmslim_sharing", None))


register_format(ModelFormat("lmslim-shared", claims=_claims,
                            save=lambda model, tokenizer, folder, dense: save_shared(model, tokenizer, folder),
                            detects=lambda config: bool(getattr(config, "lmslim_sharing", None)),
                            load=load_shared))
