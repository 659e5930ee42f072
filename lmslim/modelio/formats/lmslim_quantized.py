"""lmslim's own quantized format (``lmslim_quantization`` format 2 in config.json).

Written only for quantized models the standard ``compressed-tensors`` format cannot express (see
``compressed_tensors.expressible``); such folders refuse plain transformers (``lmslim_only``).
Folders of earlier lmslim versions (format 2 without the refusal) still load.

Format (a normal HF folder plus integer tensors):

- ``config.json``: the model config with an extra ``lmslim_quantization`` entry: format version,
  method, method config, and for every quantized module its shape, bits, group size, symmetry,
  bias flag and kernel.
- ``model.safetensors``: full-precision tensors as usual; for each quantized module ``<name>.qweight``
  (uint8, codes bit-packed densely, row-major over (out, in), little-endian bit order),
  ``<name>.scale`` and ``<name>.offset`` (fp16, (out, groups)) and ``<name>.bias``.
  Dequantized weight = ``code * scale + offset`` per (row, group); the last group may be partial.
- tokenizer files and ``generation_config.json`` as saved by transformers.

Loading builds the architecture on the meta device, swaps in ``QuantLinear`` modules and assigns
the stored tensors (``meta_load``); kernel state (e.g. fbgemm's prepacked int8 weight) is derived from the codes, so a
reloaded model gives bit-identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from lmslim.nn.quant_embedding import QuantEmbedding, retie_head
from lmslim.nn.quant_linear import QuantLinear
from lmslim.nn.scheme import Scheme
from lmslim.core.errors import UserError
from lmslim.core.targeting import set_submodule
from lmslim.modelio.formats import ModelFormat, register_format, save_config_and_tokenizer, unique_state_dict
from lmslim.modelio.formats.lmslim_only import mark_lmslim_only
from lmslim.modelio.formats.meta_load import empty_model, fill, stored_tensors
from lmslim.nn.sharing import apply_sharing
from lmslim.nn.structure import apply_structure


REASON = "quantized layers compressed-tensors cannot express"


def save_quantized(model, tokenizer, folder: Path) -> None:
    """Write a quantized model into ``folder`` (which must exist and be empty; see ``atomic_dir``).

    Only for models the ``compressed-tensors`` format cannot hold (GPT-2's ``Conv1D`` layers, the
    ``minmax`` grid, per-layer shapes, sharing); the folder refuses plain transformers (``lmslim_only``).
    """
    if not getattr(model.config, "lmslim_quantization", None):
        raise ValueError("model carries no lmslim_quantization record; quantize it with quantize_ first")
    save_config_and_tokenizer(model, tokenizer, folder)
    save_file(unique_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    mark_lmslim_only(folder, REASON)


def load_quantized(folder: Path, config, auto_class, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by :func:`save_quantized` (also folders of earlier lmslim versions)."""
    record = config.lmslim_quantization
    if record.get("format") != 2:
        raise UserError(f"{folder}: quantization format {record.get('format')} is not supported by this lmslim; "
                        "quantize the original model again")
    structure = getattr(config, "lmslim_structure", None)
    sharing = getattr(config, "lmslim_sharing", None)

    def swap(model) -> None:
        if structure:
            apply_structure(model, structure)
        for name, spec in record["modules"].items():
            set_submodule(model, name, QuantLinear(spec["in"], spec["out"], Scheme.from_record(spec), spec["bias"],
                                                   spec["kernel"]))
        for name, spec in embeddings.items():
            set_submodule(model, name, QuantEmbedding(spec["out"], spec["in"], Scheme.from_record(spec),
                                                      spec.get("padding_idx")))

    def retie(model) -> None:
        if sharing:
            apply_sharing(model, sharing)
        for name, spec in embeddings.items():  # the tied head reads the loaded table's buffers
            retie_head(model, model.get_submodule(name), spec)

    embeddings = record.get("embeddings", {})
    model = empty_model(auto_class, config, swap)
    state = dict(stored_tensors(folder))
    return fill(model, state, folder, dtype=dtype, retie=retie)


def _claims(model) -> bool:
    return bool(getattr(model.config, "lmslim_quantization", None))


register_format(ModelFormat("lmslim-quantized", claims=_claims,
                            save=lambda model, tokenizer, folder, dense: save_quantized(model, tokenizer, folder),
                            detects=lambda config: bool(getattr(config, "lmslim_quantization", None)),
                            load=load_quantized))
