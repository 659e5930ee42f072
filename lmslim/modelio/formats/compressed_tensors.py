"""Quantized models in the compressed-tensors ``pack-quantized`` layout, which plain transformers loads.

With the ``compressed-tensors`` package installed, ``AutoModelForCausalLM.from_pretrained(folder)``
rebuilds such a folder with the right weights; vLLM reads the same layout. lmslim's own
``load_model`` reads it back into ``QuantLinear`` modules with bit-identical codes.

Mapping from lmslim's grid (``lmslim.nn.scheme``: unsigned code ``c`` in ``[0, 2^b - 1]``, fp16
``scale`` and ``offset`` per (row, group), weight ``c * scale + offset``) to compressed-tensors'
(signed ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, weight ``(q - zero_point) * scale``):

- ``q = c - 2^(b-1)`` (``weight_packed``: int32 words, packed by compressed-tensors' own
  ``pack_to_int32``; ``weight_shape``: (out, in));
- symmetric grids: ``offset = -2^(b-1) * scale`` exactly, so no zero point and the weights are
  bit-identical in both loaders;
- asymmetric grids with an integer zero point ``z`` (lmslim's default, as GPTQ/AWQ use):
  ``offset = fp16(-z * scale)``; stored ``weight_zero_point = z - 2^(b-1)``. transformers computes
  ``(c - z) * scale`` exactly, lmslim ``c * scale + fp16(-z * scale)``: the two differ by the fp16
  rounding of the offset, at most 2^-11 of ``z * scale`` (below 1% of one quantization step for
  int4). A grid whose offset is not ``fp16(-z * scale)`` for an integer ``z`` in range (the Q4_1
  ``minmax`` grid) has no compressed-tensors form: such a model is not claimed here and is saved by
  ``lmslim_quantized`` as a folder plain transformers refuses;
- ``weight_scale`` is stored fp32 (the fp16 values, widened exactly) so transformers dequantizes in
  fp32, as lmslim does;
- group size: compressed-tensors needs groups that divide the row; lmslim allows a shorter last
  group (SmolLM2: 576 = 4 x 128 + 64). Such layers are written with groups of ``gcd(group, in)``
  columns, each lmslim scale repeated, which is the same grid; one group per row is the ``channel``
  strategy.

``config.json`` carries ``quantization_config`` (``quant_method: compressed-tensors``, one config
group per distinct grid, targets the exact module names) and the provenance record
``lmslim_quantization`` (format 3: method, its config, each module's lmslim scheme and kernel),
which transformers ignores.

Example:
    >>> from lmslim.modelio.formats import registered_formats
    >>> registered_formats()[0].name
    'compressed-tensors'
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.core.hostmem import return_free_memory
from lmslim.core.targeting import set_submodule
from lmslim.modelio.formats import ModelFormat, register_format, save_config_and_tokenizer, unique_state_dict
from lmslim.modelio.formats.meta_load import empty_model, fill, open_stored
from lmslim.nn.quant_embedding import QuantEmbedding, retie_head, tied_heads
from lmslim.nn.quant_linear import PackedCodes, QuantLinear
from lmslim.nn.scheme import Scheme, pack

RECORD_FORMAT = 3  # lmslim_quantization format 3: tensors in the compressed-tensors layout


def _ct():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise UserError("the compressed-tensors package is missing; reinstall lmslim (pip install lmslim)") from e
    return pack_to_int32, unpack_from_int32


def zero_points(mod: QuantLinear) -> torch.Tensor | None:
    """Integer zero points (out, groups) that reproduce ``mod``'s offsets exactly, or None if there are none.

    Symmetric grids return a tensor of ``2^(b-1)`` (no zero point is stored for them).
    """
    s, o = mod.scale.float(), mod.offset
    z = torch.round(-o.float() / s)
    if not torch.equal((-z * s).half(), o) or bool((z < 0).any() or (z > mod.scheme.qmax).any()):
        return None
    if mod.scheme.symmetric and not bool((z == mod.scheme.half).all()):
        return None
    return z.to(torch.int32)


def _original_types(model: nn.Module) -> dict[str, type]:
    """Module types of the unquantized architecture (built on meta: no memory)."""
    with torch.device("meta"):
        ref = type(model)(copy.deepcopy(model.config))
    return {n: type(m) for n, m in ref.named_modules()}


def stored_grids(model: nn.Module) -> dict[str, PackedCodes]:
    """The quantized modules whose tensors a folder stores: every one but an LM head tied to its embedding."""
    heads = tied_heads(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedCodes) and n not in heads}


def expressible(model: nn.Module) -> bool:
    """Whether every quantized layer of ``model`` has an exact compressed-tensors form."""
    if getattr(model.config, "lmslim_structure", None) or getattr(model.config, "lmslim_sharing", None):
        return False
    quant = stored_grids(model)
    if not quant or tied_heads(model):
        # transformers (5.25) cannot tie an LM head to a compressed-tensors embedding (it looks for the
        # table's .weight, or multiplies by its int8 codes): such a folder is lmslim's own (lmslim_quantized)
        return False
    types = _original_types(model)
    original = {QuantLinear: nn.Linear, QuantEmbedding: nn.Embedding}
    return all(types.get(n) is original[type(m)] and zero_points(m) is not None for n, m in quant.items())


def _ct_group(mod: QuantLinear) -> int | None:
    """compressed-tensors group size for ``mod`` (None: one group per row, the channel strategy)."""
    g = mod.scheme.group(mod.in_features)
    return None if g == mod.in_features else math.gcd(g, mod.in_features)


def _weight_args(mod: QuantLinear) -> dict[str, Any]:
    g = _ct_group(mod)
    return {"num_bits": mod.scheme.bits, "type": "int", "symmetric": mod.scheme.symmetric,
            "strategy": "channel" if g is None else "group", "group_size": g, "dynamic": False}


def storage_format(mod: QuantLinear) -> str:
    """``pack-quantized`` for symmetric grids; ``int-quantized`` (one int8 per code) for asymmetric ones.

    Asymmetric ``pack-quantized`` does not load in transformers 5.24 with compressed-tensors 0.20:
    the model it prepares expects the zero point unpacked while the decompressor unpacks it again
    (a packed zero point fails with a shape mismatch; an unpacked one loads wrong numbers).
    ``int-quantized`` stores codes and zero points unpacked and loads exactly.
    """
    if isinstance(mod, QuantEmbedding):  # transformers reads a packed embedding's missing .weight and fails
        return "int-quantized"
    return "pack-quantized" if mod.scheme.symmetric else "int-quantized"


def module_tensors(mod: QuantLinear) -> dict[str, torch.Tensor]:
    pack_to_int32, _ = _ct()
    half = mod.scheme.half
    q = (mod.codes().to(torch.int16) - half).to(torch.int8)  # (out, in) signed codes
    g = _ct_group(mod)
    repeat = 1 if g is None else mod.scheme.group(mod.in_features) // g
    n_ct = 1 if g is None else mod.in_features // g

    def spread(t: torch.Tensor) -> torch.Tensor:  # (out, G) lmslim groups -> (out, n_ct) equal-width groups
        return t.repeat_interleave(repeat, dim=1)[:, :n_ct].contiguous()

    out = {"weight_scale": spread(mod.scale.float())}
    if storage_format(mod) == "pack-quantized":
        out["weight_packed"] = pack_to_int32(q, mod.scheme.bits)
        out["weight_shape"] = torch.tensor([mod.out_features, mod.in_features])
    else:
        out["weight"] = q.contiguous()
        if not mod.scheme.symmetric:
            out["weight_zero_point"] = (spread(zero_points(mod)) - half).to(torch.int8)  # (out, n_ct)
    if mod.bias is not None:
        out["bias"] = mod.bias.detach().float().contiguous()
    return out


def quantization_config(quant: dict[str, QuantLinear]) -> dict[str, Any]:
    """The ``quantization_config`` entry: one config group per distinct grid, targeting exact names."""
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, dict[str, Any]] = {}
    for name, mod in quant.items():
        args = _weight_args(mod)
        key = json.dumps(args, sort_keys=True)
        fmt = storage_format(mod)
        groups.setdefault(key + fmt, {"targets": [], "weights": args, "format": fmt})
        groups[key + fmt]["targets"].append(f"re:^{re.escape(name)}$")
    formats = {g["format"] for g in groups.values()}
    cfg = QuantizationConfig(config_groups={f"group_{i}": g for i, g in enumerate(groups.values())},
                             format=formats.pop() if len(formats) == 1 else "mixed-precision", quantization_status="compressed", ignore=[])
    import compressed_tensors

    return {**cfg.model_dump(mode="json"), "quant_method": "compressed-tensors",
            "version": compressed_tensors.__version__}


def save_compressed(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a quantized model into the existing, empty ``folder`` in the compressed-tensors layout."""
    from safetensors.torch import save_file

    if not expressible(model):
        raise UserError("this quantized model has no exact compressed-tensors form; save it with save_model")
    quant = stored_grids(model)
    skip = set(quant) | tied_heads(model)
    state = {k: v for k, v in unique_state_dict(model).items() if k.rpartition(".")[0] not in skip}
    for name, mod in quant.items():
        state.update({f"{name}.{k}": v for k, v in module_tensors(mod).items()})
    save_config_and_tokenizer(model, tokenizer, folder)
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    record = dict(data.get("lmslim_quantization") or {})
    data["lmslim_quantization"] = {**record, "format": RECORD_FORMAT}
    data["quantization_config"] = quantization_config(quant)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def read_grid(name: str, spec: dict[str, Any], t: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """One stored module's grid in lmslim's layout: packed codes, (out, G) scale and offset, scheme."""
    scheme = Scheme.from_record(spec)
    out, k = spec["out"], spec["in"]
    packed_layout = "weight_packed" in t  # see storage_format
    try:
        scale_ct = t["weight_scale"]
        if packed_layout:
            words, shape = t["weight_packed"], [int(v) for v in t["weight_shape"]]
        else:
            q = t["weight"]
            zp = None if scheme.symmetric else t["weight_zero_point"]
            shape = list(q.shape)
    except KeyError as e:
        raise UserError(f"{folder}: {name}.{e.args[0]} is missing from the stored weights; re-export the model") from None
    if shape != [out, k]:
        raise UserError(f"{folder}: {name} is stored with another shape than its record says; re-export the model")
    if packed_layout:
        qweight = _packed_codes(words, scheme.bits, out, k)
    else:
        qweight = pack((q.to(torch.int16) + scheme.half).to(torch.uint8), scheme.bits)
    g = scheme.group(k)
    step = 1 if g == k else g // math.gcd(g, k)
    scale = scale_ct[:, ::step].half()  # (out, G): every lmslim group's first repeated copy
    if scheme.symmetric:
        offset = (-scheme.half * scale.float()).half()
    else:
        z = zp[:, ::step].float() + scheme.half
        offset = (-z * scale.float()).half()
    return {"qweight": qweight, "shape": (out, k), "scale": scale, "offset": offset, "scheme": scheme}


def _packed_codes(words: torch.Tensor, bits: int, out: int, k: int) -> torch.Tensor:
    """lmslim's packed codes (flat uint8, ``scheme.pack``'s layout) from compressed-tensors' int32 words (out, W).

    compressed-tensors packs each row as a little-endian bit stream of ``q + 2^(b-1)``, which is
    lmslim's unsigned code, padded to whole words; lmslim's ``pack`` is the same bit stream over all
    rows. So on a little-endian host, when a row fills whole bytes, the words' bytes with each row's
    padding cut are lmslim's packed codes: no unpacking, and no import of compressed-tensors (whose
    import alone costs ~110 MB of memory) on load.
    """
    if sys.byteorder == "little" and (k * bits) % 8 == 0:
        row_bytes = words.contiguous().view(torch.uint8).reshape(out, -1)  # (out, 4 * W)
        if row_bytes.shape[1] >= k * bits // 8:
            return row_bytes[:, : k * bits // 8].reshape(-1)
    _, unpack_from_int32 = _ct()
    q = unpack_from_int32(words, bits, torch.Size([out, k]))
    return pack((q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8), bits)


def load_compressed(folder: Path, config: Any, auto_class: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`: meta architecture, ``QuantLinear`` modules, stored tensors."""
    record = getattr(config, "lmslim_quantization", None)
    if not record or record.get("format") != RECORD_FORMAT:
        raise UserError(f"{folder}: a compressed-tensors folder not written by lmslim; lmslim reads only its own "
                        "(load it with transformers, or quantize the original model with lmslim)")
    modules = record["modules"]
    config = copy.deepcopy(config)
    del config.quantization_config  # the in-memory model is lmslim's QuantLinear one, not compressed-tensors'
    config.lmslim_quantization = {**record, "format": 2}  # the record of a model in memory (see compress.quantize)
    model = empty_model(auto_class, config)
    embeddings = record.get("embeddings", {})
    with open_stored(folder) as stored:
        leaves: dict[str, list[str]] = {n: [] for n in [*modules, *embeddings]}
        state_keys = []
        for key in stored.names():
            owner, _, leaf = key.rpartition(".")
            (leaves[owner].append(leaf) if owner in leaves else state_keys.append(key))
        for name, spec in [*modules.items(), *embeddings.items()]:  # one module's stored tensors at a time
            tensors = {leaf: stored.read(f"{name}.{leaf}") for leaf in leaves[name]}
            grid = read_grid(name, spec, tensors, folder)
            if name in modules:
                mod = QuantLinear.from_packed(**grid, bias=tensors.get("bias"), kernel=spec["kernel"])
            else:
                mod = QuantEmbedding.from_packed(**grid, padding_idx=spec.get("padding_idx"))
                retie_head(model, mod, spec)
            set_submodule(model, name, mod)
            del tensors, grid
            return_free_memory()  # the layer's temporaries, not kept between the layers that stay
        state = {k: stored.read(k) for k in state_keys}
    return fill(model, state, folder, dtype=dtype)


def _detects(config: Any) -> bool:
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(method) in ("compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS")


register_format(ModelFormat("compressed-tensors", claims=expressible,
                            save=lambda model, tokenizer, folder, dense: save_compressed(model, tokenizer, folder),
                            detects=_detects, load=load_compressed))
