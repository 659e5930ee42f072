"""GGUF export for llama.cpp: Llama-architecture models, float or block-quantized on lmslim's rounding.

The file holds llama.cpp's ``llama`` architecture metadata, the tokenizer (``gguf_vocab``) and the
tensors under llama.cpp's names. Hugging Face stores each q/k head's rotary pairs as two halves
(``rotate_half``); llama.cpp's Llama rotates adjacent pairs, so the rows of q and k are permuted
per head (``[h, 2, d/2] -> [h, d/2, 2]``), as llama.cpp's own converter does for HF checkpoints.
Quantization groups run along rows, so permuting rows moves whole groups: codes are permuted with
their scales, never re-rounded.

Each tensor's type: 1-D norms are always f32; ``token_embd``/``output`` take ``embed_type``
(default q8_0 under a 4-bit type, as llama.cpp keeps a tied embedding, else the base type); every
other matrix the base ``type``; ``tensor_types`` globs override any matrix. A float weight going to
a block type is rounded with lmslim's RTN on that type's grid (``gguf_blocks.round_on``; q5_0/q5_1 and
the k-quants q2_k…q6_k in ``gguf_kquants`` / ``gguf_kquants_low``, optionally weighted by calibration
importance, ``gguf_imatrix``; k-quant rows not divisible by 256 take llama.cpp's fallback type, listed
in the report's ``fallbacks``); blocks a calibrated method already chose on the tensor's own grid
(``GGUFExportConfig.encoded``, from ``lmslim.compress.export``'s GPTQ) are written as they are; a weight lmslim
already quantized is written as its codes when its grid is the type's, as exact f32 values for
``f32``, and refused otherwise (no silent re-rounding).

Refused with a one-line error: non-Llama models, biases, non-default RoPE, layers of different shapes
(``lmslim_structure`` with per-layer heads/FFN width: llama.cpp's ``llama`` holds one of each),
rows a block type cannot split, tokenizers llama.cpp cannot reproduce.

Example:
    >>> import tempfile, pathlib
    >>> from lmslim.modelio import load_model
    >>> from lmslim.modelio.export import export_model
    >>> lm = load_model("builtin:tiny-llama")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf"
    >>> export_model(lm.model, lm.tokenizer, "gguf", out, GGUFExportConfig(type="f32"))["types"]
    {'f32': 20}
"""

from __future__ import annotations

import fnmatch
import re
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.modelio.export import Exporter, register_exporter
from lmslim.modelio.export.gguf_blocks import (BLOCK, BLOCK_TYPES, FLOAT_TYPES, GGUF_TYPES, MIX_TYPES, check_type,
                                               encode_codes, fits_grid, ggml_type, mix_type, round_on, storable_type)
from lmslim.modelio.export.gguf_kquants import quantize_float
from lmslim.modelio.export.gguf_vocab import add_tokenizer
from lmslim.nn.blocks import family, transformer_blocks
from lmslim.nn.quant_linear import QuantLinear, linear_weight

log = logging.getLogger(__name__)

_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q4_k": "MOSTLY_Q4_K_S", "q6_k": "MOSTLY_Q6_K",
              "q4_k_m": "MOSTLY_Q4_K_M", "q5_1": "MOSTLY_Q5_1", "q5_k": "MOSTLY_Q5_K_S", "q3_k": "MOSTLY_Q3_K_S",
              "q3_k_m": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K"}
_EMBED_NAMES = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class GGUFExportConfig:
    """What each tensor of the GGUF file becomes.

    Args:
        type: base type of the matrices: f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q3_k, or
            one of llama.cpp's mixes q4_k_m, q3_k_m, q2_k (``gguf_blocks.mix_type``).
        embed_type: type of ``token_embd`` and ``output`` (None: q8_0 under q4_0/q4_1/q5_0/q5_1, q6_k under
            a 3-5-bit k-quant, a mix's own rule for a mix, as llama.cpp; else ``type``).
        tensor_types: ``(glob, type)`` pairs on GGUF tensor names (``blk.*.ffn_down.weight``); first match wins.
        clip_search: round float weights with the clipping search of ``scheme.search_params``.
        importance: GGUF tensor name -> per-input-column weights of the squared rounding error
            (e.g. calibration ``E[x²]``, ``gguf_imatrix``) for the q5_0 / k-quant searches.
        encoded: GGUF tensor name -> (type, raw blocks in the module's own row order): tensors a calibrated
            method already rounded on that type's grid (``lmslim.compress.export``); written as they are.
    """

    type: str = "f16"
    embed_type: str | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()
    clip_search: bool = False
    importance: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    encoded: Mapping[str, tuple[str, np.ndarray]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_type(self.type)
        if self.embed_type is not None:
            check_type(self.embed_type)
        for pattern, t in self.tensor_types:
            check_type(t)
            if not pattern:
                raise UserError("a tensor-type pattern is empty; give a glob such as 'blk.*.ffn_down.weight'")

    def type_for(self, name: str, n_layers: int = 0, gqa: int = 1, tied: bool = True) -> str:
        """The requested type of tensor ``name`` (before a k-quant's row fallback, ``storable_type``)."""
        if name.endswith("_norm.weight"):
            return "f32"  # llama.cpp's norms are f32 vectors
        for pattern, t in self.tensor_types:
            if fnmatch.fnmatchcase(name, pattern):
                return t
        if name in _EMBED_NAMES:
            if self.embed_type is not None:
                return self.embed_type
            if self.type in MIX_TYPES:
                return mix_type(self.type, name, n_layers, gqa, tied)
            if self.type in ("q4_k", "q5_k", "q3_k"):
                return "q6_k"
            return "q8_0" if self.type in ("q4_0", "q4_1", "q5_0", "q5_1") else self.type
        if self.type in MIX_TYPES:
            return mix_type(self.type, name, n_layers, gqa)
        return self.type


@dataclass
class _Tensor:
    name: str
    module: nn.Module | None  # a Linear/QuantLinear, or None for a plain tensor
    tensor: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # row order for llama.cpp (q/k rotary layout)


def _rope_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row index taking HF's per-head [first halves | second halves] to llama.cpp's interleaved pairs."""
    d = n_rows // n_heads
    return torch.arange(n_rows).reshape(n_heads, 2, d // 2).transpose(1, 2).reshape(-1)  # (h, d/2, 2) flat


def _rows(module: nn.Module) -> int:
    return module.out_features if isinstance(module, QuantLinear) else linear_weight(module).shape[0]


def _llama_shape(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama" or family(model) != "llama":
        raise UserError(f"GGUF export supports Llama-architecture causal LMs; this model is "
                        f"{getattr(cfg, 'model_type', type(model).__name__)}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UserError("GGUF export: this Llama has bias terms, which lmslim's GGUF writer does not map")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not mapped; only plain RoPE is")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export: activation {cfg.hidden_act!r}; llama.cpp's llama uses silu")
    _, blocks = transformer_blocks(model)
    shapes = set()
    for b in blocks:
        a = b.self_attn
        d = a.head_dim
        shapes.add((_rows(a.q_proj) // d, _rows(a.k_proj) // d, _rows(b.mlp.gate_proj), d))
    if len(shapes) > 1:
        raise UserError(f"GGUF export: layers have different shapes ({len(shapes)} distinct heads/FFN widths); "
                        "llama.cpp's llama architecture needs one head count and FFN width for all layers")
    heads, kv, ff, d = shapes.pop()
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return {"layers": len(blocks), "heads": heads, "kv_heads": kv, "ff": ff, "head_dim": d,
            "hidden": cfg.hidden_size, "context": cfg.max_position_embeddings, "eps": cfg.rms_norm_eps,
            "theta": float(theta)}


def _tensors(model: nn.Module, shape: dict[str, Any]) -> list[_Tensor]:
    base = model.model
    out = [_Tensor("token_embd.weight", None, base.embed_tokens.weight.data)]
    for i, b in enumerate(base.layers):
        a, m = b.self_attn, b.mlp
        p = f"blk.{i}."
        q_rows = _rope_rows(_rows(a.q_proj), shape["heads"])
        k_rows = _rope_rows(_rows(a.k_proj), shape["kv_heads"])
        out += [_Tensor(p + "attn_norm.weight", None, b.input_layernorm.weight.data),
                _Tensor(p + "attn_q.weight", a.q_proj, rows=q_rows), _Tensor(p + "attn_k.weight", a.k_proj, rows=k_rows),
                _Tensor(p + "attn_v.weight", a.v_proj), _Tensor(p + "attn_output.weight", a.o_proj),
                _Tensor(p + "ffn_norm.weight", None, b.post_attention_layernorm.weight.data),
                _Tensor(p + "ffn_gate.weight", m.gate_proj), _Tensor(p + "ffn_up.weight", m.up_proj),
                _Tensor(p + "ffn_down.weight", m.down_proj)]
    out.append(_Tensor("output_norm.weight", None, base.norm.weight.data))
    head = model.lm_head
    tied = not isinstance(head, QuantLinear) and head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()
    if not tied:  # a tied head is token_embd itself; llama.cpp reuses it when output.weight is absent
        out.append(_Tensor("output.weight", head))
    return out


def gguf_names(model: nn.Module) -> dict[str, str]:
    """Module name (``model.layers.0.self_attn.q_proj``) -> GGUF tensor name, for every exported matrix module."""
    by_id = {id(m): n for n, m in model.named_modules()}
    return {by_id[id(t.module)]: t.name for t in _tensors(model, _llama_shape(model)) if t.module is not None}


def planned_types(model: nn.Module, config: GGUFExportConfig) -> dict[str, str]:
    """GGUF tensor name -> the type it is written as (after a k-quant's row fallback), for every tensor."""
    shape = _llama_shape(model)
    tensors = _tensors(model, shape)
    tied = not any(t.name == "output.weight" for t in tensors)
    gqa = shape["heads"] // shape["kv_heads"]
    kinds = {t.name: storable_type(config.type_for(t.name, shape["layers"], gqa, tied), _cols(t)) for t in tensors}
    for t in tensors:  # the writer's own check, before any calibration runs
        if kinds[t.name] not in FLOAT_TYPES and _cols(t) % BLOCK:
            _unsplittable(t.name, _cols(t), kinds[t.name])
    return kinds


def _unsplittable(name: str, cols: int, kind: str):
    glob = re.sub(r"^blk\.\d+\.", "blk.*.", name)
    raise UserError(f"{name} has rows of {cols} weights, which {kind}'s blocks of {BLOCK} do not "
                    f"divide; keep it wider, e.g. --tensor-type '{glob}=f16'")


def _encode(t: _Tensor, kind: str, config: GGUFExportConfig) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for one tensor; ``kind`` is its storable type."""
    done = (config.encoded or {}).get(t.name)
    if done is not None:  # rounded by a calibrated method on this type's grid: its blocks as they are
        if done[0] != kind or isinstance(t.module, QuantLinear):
            raise UserError(f"{t.name}: calibrated blocks of type {done[0]} do not match its type {kind}")
        raw = done[1]
        return (raw[t.rows.numpy()] if t.rows is not None else raw), ggml_type(kind)  # whole rows move
    quant = t.module if isinstance(t.module, QuantLinear) else None
    if quant is not None:
        if kind == "f32":
            w = quant.dequantized_weight()  # exact: codes·scale + offset is representable in fp32
        elif kind in BLOCK_TYPES and fits_grid(quant.scheme, kind) and quant.in_features % BLOCK == 0:
            codes, scale, offset = quant.codes(), quant.scale, quant.offset
            if t.rows is not None:
                codes, scale, offset = codes[t.rows], scale[t.rows], offset[t.rows]
            return encode_codes(codes, scale, offset, kind), ggml_type(kind)
        else:
            s = quant.scheme
            raise UserError(f"{t.name} is already quantized (w{s.bits} g{s.group_size or 'channel'} "
                            f"{'sym' if s.symmetric else 'asym'}), which is not the {kind} grid; re-rounding it "
                            "would add error: export the full-precision model, or use a matching --type or f32")
    else:
        w = t.tensor if t.module is None else linear_weight(t.module)
    w = w.detach().float().cpu()
    if t.rows is not None:
        w = w[t.rows]
    if kind in FLOAT_TYPES:
        arr = w.numpy()
        return (arr if kind == "f32" else arr.astype(np.float16)), None
    if w.ndim != 2 or w.shape[1] % BLOCK:
        _unsplittable(t.name, w.shape[-1], kind)
    imp = (config.importance or {}).get(t.name)
    if kind not in BLOCK_TYPES:  # q5_0, q5_1 and the k-quants: lmslim's searches in gguf_kquants(_low)
        return quantize_float(w.numpy(), kind, imp), ggml_type(kind)
    codes, scale, offset = round_on(w, kind, config.clip_search, imp)
    return encode_codes(codes, scale, offset, kind), ggml_type(kind)


def _cols(t: _Tensor) -> int:
    if t.module is None:
        return int(t.tensor.shape[-1])
    return t.module.in_features if isinstance(t.module, QuantLinear) else int(linear_weight(t.module).shape[1])


def _framing(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts special tokens before / after a text (found by encoding a probe)."""
    probe = "Hello world, 42 times."
    framed = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    start = next((p for p in range(len(framed) - len(bare) + 1) if framed[p:p + len(bare)] == bare), 0)
    return start > 0, len(framed) > start + len(bare)


def _writer(path: Path):
    import gguf

    class _Writer(gguf.GGUFWriter):
        # gguf-py refuses empty arrays, but the format has them and llama.cpp needs one: a byte-level
        # tokenizer has no merges, yet llama.cpp requires the merges key to be present.
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return _Writer(str(path), "llama")


def write_gguf(model: nn.Module, tokenizer, path: Path, config: GGUFExportConfig) -> dict[str, Any]:
    """Write ``model`` as a llama.cpp GGUF file at ``path`` (overwritten; callers publish atomically)."""
    import gguf

    if tokenizer is None:
        raise UserError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    shape = _llama_shape(model)
    tensors = _tensors(model, shape)
    encoded = []
    fallbacks = Counter()
    tied = not any(t.name == "output.weight" for t in tensors)
    for t in tensors:  # every tensor is checked before anything is written
        wanted = config.type_for(t.name, shape["layers"], shape["heads"] // shape["kv_heads"], tied)
        cols = _cols(t)
        kind = storable_type(wanted, cols)
        if kind != wanted:  # as llama.cpp: a row that does not split into 256 takes the fallback type
            fallbacks[f"{wanted}->{kind}"] += 1
        arr, raw = _encode(t, kind, config)
        encoded.append((t.name, kind, arr, raw))
    if fallbacks:
        log.info("GGUF: k-quant fallbacks for rows not divisible by 256: %s", dict(fallbacks))
    w = _writer(path)
    w.add_name(str(getattr(model.config, "_name_or_path", "") or "lmslim export").split("/")[-1] or "lmslim export")
    w.add_context_length(shape["context"])
    w.add_embedding_length(shape["hidden"])
    w.add_block_count(shape["layers"])
    w.add_feed_forward_length(shape["ff"])
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    w.add_key_length(shape["head_dim"])  # explicit: after head pruning heads·head_dim != hidden
    w.add_value_length(shape["head_dim"])
    w.add_rope_dimension_count(shape["head_dim"])
    w.add_rope_freq_base(shape["theta"])
    w.add_layer_norm_rms_eps(float(shape["eps"]))
    vocab_size = int(model.model.embed_tokens.weight.shape[0])
    w.add_vocab_size(vocab_size)
    w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[config.type]]))
    if any(kind not in FLOAT_TYPES for _, kind, _, _ in encoded):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_tokenizer(w, tokenizer, vocab_size, *_framing(tokenizer))
    for name, _, arr, raw in encoded:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    types = Counter(kind for _, kind, _, _ in encoded)
    return {"format": "gguf", "architecture": "llama", "type": config.type, "types": dict(types),
            "tensors": len(encoded), "tokenizer": vocab, "shape": shape, "fallbacks": dict(fallbacks),
            "bytes": int(Path(path).stat().st_size)}


def _write(model, tokenizer, path: Path, options: GGUFExportConfig | None) -> dict[str, Any]:
    return write_gguf(model, tokenizer, path, options or GGUFExportConfig())


register_exporter(Exporter("gguf", ".gguf", GGUF_TYPES, _write, config=GGUFExportConfig, engine="llama.cpp"))
