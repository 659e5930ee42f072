"""lmslim's own quantized format (``lmslim_quantization`` in config.json).

Format (a normal HF folder plus integer tensors):

- ``config.json``: the model config with an extra ``lmslim_quantization`` entry: format version,
  method, method config, and for every quantized module its shape, bits, group size, symmetry,
  bias flag and kernel.
- ``model.safetensors``: full-precision tensors as usual; for each quantized module ``<name>.qweight``
  (uint8, codes bit-packed densely, row-major over (out, in), little-endian bit order),
  ``<name>.scale`` and ``<name>.offset`` (fp16, (out, groups)) and ``<name>.bias``.
  Dequantized weight = ``code * scale + offset`` per (row, group); the last group may be partial.
- tokenizer files and ``generation_config.json`` as saved by transformers.

Loading rebuilds the architecture from the config, swaps in empty ``QuantLinear`` modules and loads
the tensors; kernel state (e.g. fbgemm's prepacked int8 weight) is derived from the codes, so a
reloaded model gives bit-identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmslim.nn.quant_linear import QuantLinear
from lmslim.nn.scheme import Scheme
from lmslim.core.errors import UserError
from lmslim.core.targeting import set_submodule
from lmslim.modelio.formats import ModelFormat, register_format, save_config_and_tokenizer, unique_state_dict


def save_quantized(model, tokenizer, folder: Path) -> None:
    """Write a quantized model into ``folder`` (which must exist and be empty; see ``atomic_dir``)."""
    if not getattr(model.config, "lmslim_quantization", None):
        raise ValueError("model carries no lmslim_quantization record; quantize it with quantize_ first")
    save_config_and_tokenizer(model, tokenizer, folder)
    save_file(unique_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_quantized(folder: Path, config, auto_class, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by :func:`save_quantized`."""
    record = config.lmslim_quantization
    if record.get("format") != 2:
        raise UserError(f"{folder}: quantization format {record.get('format')} is not supported by this lmslim")
    model = auto_class.from_config(config, dtype=torch.float32)
    for name, spec in record["modules"].items():
        scheme = Scheme(spec["bits"], spec["group_size"], spec["symmetric"], spec.get("minmax", False))
        set_submodule(model, name, QuantLinear(spec["in"], spec["out"], scheme, spec["bias"], spec["kernel"]))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise UserError(f"{folder}: quantized weights do not match the recorded layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _claims(model) -> bool:
    return bool(getattr(model.config, "lmslim_quantization", None))


register_format(ModelFormat("lmslim-quantized", claims=_claims, save=lambda model, tokenizer, folder, dense: save_quantized(model, tokenizer, folder),
                            detects=lambda config: bool(getattr(config, "lmslim_quantization", None)),
                            load=load_quantized))
