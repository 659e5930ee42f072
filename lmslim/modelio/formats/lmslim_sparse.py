"""lmslim's own pruned format (``lmslim_sparsity`` / ``lmslim_structure`` in config.json).

Written only for per-layer structured shapes, which a model config cannot hold; such folders refuse
plain transformers (``lmslim_only``). Every other pruned model (unstructured, 2:4, uniform
structured) is saved as an ordinary dense folder: compressed-tensors 0.20 has no sparse
compressors any more (``sparse-bitmask`` / ``sparse-24-bitmask`` are config names only), so a
bitmask layout would load in plain transformers with missing (random) weights. Folders of earlier
lmslim versions with ``lmslim_sparsity`` (bitmask-compressed tensors) still load.

Format (a normal HF folder; only what pruning changed differs):

- ``config.json``: the model config, with the pruned shapes written into its ordinary fields where
  every block is alike (then plain ``transformers`` ``from_pretrained`` loads the folder), plus:

  - ``lmslim_structure`` (only for per-layer shapes that differ): ``{"format": 1, "family":
    "llama"|"gpt2", "layers": [{"intermediate_size", "num_attention_heads", "num_key_value_heads"},
    ...]}``, one entry per decoder layer;
  - ``lmslim_sparsity`` (only when saved compressed): ``{"format": 1, "tensors": {name: {"shape",
    "dtype"}}}`` for every tensor stored as bitmask + values;
  - ``lmslim_pruning``: provenance (the methods applied, and the N:M pattern if any).
- ``model.safetensors``: dense tensors as usual, except that each compressed tensor ``name`` is
  stored as ``name.sparse_bitmask`` (uint8, one bit per element in row-major order, little-endian
  bit order; 1 = stored) and ``name.sparse_values`` (the stored elements in row-major order, in the
  tensor's own dtype). An element is stored when its bit pattern is not all zeros, so ``-0.0``
  survives and the reload is bit-identical.

A tensor is compressed only when that is smaller: for fp32 that is below ~97% density (the bitmask
costs 1/32 of the dense size); ``save_model(..., dense=True)`` stores them densely.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lmslim.core.errors import UserError
from lmslim.modelio.formats import ModelFormat, register_format, save_config_and_tokenizer, unique_state_dict
from lmslim.modelio.formats.lmslim_only import mark_lmslim_only
from lmslim.modelio.formats.meta_load import empty_model, fill, stored_tensors
from lmslim.nn.structure import apply_structure

SPARSITY_FORMAT = 1
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}



def encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask uint8, values) for a tensor; the mask marks elements whose bits are not all zero."""
    flat = t.reshape(-1)
    stored = flat.view(_INT_VIEW[t.element_size()]) != 0
    bits = np.packbits(stored.numpy(), bitorder="little")
    return torch.from_numpy(bits), flat[stored].clone()


def decode(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    stored = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=numel, bitorder="little").astype(bool))
    flat = torch.zeros(numel, dtype=values.dtype)
    if int(stored.sum()) != values.numel():
        raise UserError("a sparse tensor's bitmask and values disagree; the file is damaged, re-export it")
    flat[stored] = values
    return flat.reshape(shape)


def _worth_compressing(t: torch.Tensor) -> bool:
    if t.dim() != 2 or not t.is_floating_point():
        return False
    nnz = int((t.reshape(-1).view(_INT_VIEW[t.element_size()]) != 0).sum())
    dense = t.numel() * t.element_size()
    return nnz * t.element_size() + (t.numel() + 7) // 8 < dense


def save_pruned(model, tokenizer, folder: Path, compress: bool = True) -> dict[str, int]:
    """Write a pruned model into ``folder`` (created if needed; see ``lmslim.core.io.atomic_dir`` for atomicity).

    Returns:
        ``{"compressed_tensors": n, "bytes": size of model.safetensors}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = unique_state_dict(model)
    record = {}
    if compress:
        for name in [n for n, t in state.items() if _worth_compressing(t)]:
            t = state.pop(name)
            state[f"{name}.sparse_bitmask"], state[f"{name}.sparse_values"] = encode(t)
            record[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    cfg = model.config
    if record:
        cfg.lmslim_sparsity = {"format": SPARSITY_FORMAT, "tensors": record}
    elif hasattr(cfg, "lmslim_sparsity"):
        del cfg.lmslim_sparsity
    save_config_and_tokenizer(model, tokenizer, folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {"compressed_tensors": len(record), "bytes": (folder / "model.safetensors").stat().st_size}


def load_pruned(folder: Path, config, auto_class, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by :func:`save_pruned` (per-layer shapes and/or compressed tensors)."""
    sparsity = getattr(config, "lmslim_sparsity", None) or {}
    if sparsity and sparsity.get("format") != SPARSITY_FORMAT:
        raise UserError(f"{folder}: sparse format {sparsity.get('format')} is not supported by this lmslim; "
                        "prune the original model again")
    structure = getattr(config, "lmslim_structure", None)
    model = empty_model(auto_class, config, (lambda m: apply_structure(m, structure)) if structure else None)
    state = dict(stored_tensors(folder))
    for name, spec in sparsity.get("tensors", {}).items():
        try:
            bitmask, values = state.pop(f"{name}.sparse_bitmask"), state.pop(f"{name}.sparse_values")
        except KeyError:
            raise UserError(f"{folder}: sparse tensor {name} is missing from model.safetensors; re-export it") from None
        state[name] = decode(bitmask, values, spec["shape"])
    model = fill(model, state, folder, dtype=dtype)
    if hasattr(model.config, "lmslim_sparsity"):
        # The record describes the file, not the model in memory (its tensors are dense now): a later
        # plain save_pretrained (e.g. after recovery training) must not claim compressed tensors.
        del model.config.lmslim_sparsity
    return model


def _detects(config) -> bool:
    return bool(getattr(config, "lmslim_sparsity", None) or getattr(config, "lmslim_structure", None))


REASON = "per-layer pruned shapes"


def _save(model, tokenizer, folder: Path, dense: bool) -> None:
    save_pruned(model, tokenizer, folder, compress=not dense)
    mark_lmslim_only(folder, REASON)


def _claims(model) -> bool:
    # Only per-layer shapes need this format; any other pruned model (unstructured, N:M, uniform
    # structured) is an ordinary dense folder that every tool reads (zeros stored as zeros).
    return bool(getattr(model.config, "lmslim_structure", None))


register_format(ModelFormat("lmslim-sparse", claims=_claims, save=_save, detects=_detects, load=load_pruned))
