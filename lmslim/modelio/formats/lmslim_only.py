"""Folders only lmslim can read: plain transformers must refuse them, never load random weights.

Per-layer structured shapes, cross-layer sharing, and quantized layers compressed-tensors cannot
express have no standard layout. Their folders keep lmslim's own layout, and ``config.json`` is
made unloadable elsewhere: its ``model_type`` becomes a sentence that names lmslim and the reason
(the real one moves to ``lmslim_model_type``). transformers' ``AutoConfig`` /
``AutoModelForCausalLM.from_pretrained`` then stop with::

    ValueError: The checkpoint you are trying to load has model type `lmslim-only (per-layer pruned
    shapes); load it with lmslim.modelio.load_model` but Transformers does not recognize ...

(An unknown ``quantization_config.quant_method`` would not do: transformers only warns and loads
the model with random layers.) :func:`read_config` undoes the change for lmslim's own loader.

Example:
    >>> lmslim_only_type("layer sharing")
    'lmslim-only (layer sharing); load it with lmslim.modelio.load_model'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REAL_TYPE_KEY = "lmslim_model_type"


def lmslim_only_type(reason: str) -> str:
    return f"lmslim-only ({reason}); load it with lmslim.modelio.load_model"


def mark_lmslim_only(folder: Path, reason: str) -> None:
    """Rewrite ``folder/config.json`` so that only lmslim loads it (see the module docstring)."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data[REAL_TYPE_KEY] = data["model_type"]
    data["model_type"] = lmslim_only_type(reason)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_lmslim_only(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    try:
        return REAL_TYPE_KEY in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def read_config(folder: Path) -> Any:
    """The transformers config of a lmslim-only folder, with its real ``model_type`` restored."""
    from transformers import AutoConfig

    data = json.loads((Path(folder) / "config.json").read_text())
    data["model_type"] = data.pop(REAL_TYPE_KEY)
    data.pop("transformers_version", None)
    return AutoConfig.for_model(**data)
