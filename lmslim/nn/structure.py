"""Per-layer block shapes: the ``lmslim_structure`` record and rebuilding a model to it.

Structured pruning can leave each decoder layer with its own number of heads and FFN width; most
architectures' configs hold one value for all layers, so the per-layer shapes travel in a record
(``{"format": 1, "family": "llama"|"gpt2", "layers": [{"intermediate_size",
"num_attention_heads", "num_key_value_heads"}, ...]}``) and a loader reshapes a freshly built model
before reading the weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmslim.core.errors import UserError
from lmslim.nn.blocks import attention, family, new_linear_like, transformer_blocks
from lmslim.nn.quant_linear import linear_weight

STRUCTURE_FORMAT = 1


def apply_structure(model: nn.Module, record: dict[str, Any]) -> None:
    """Reshape a freshly built model's blocks to a ``lmslim_structure`` record (weights left empty)."""
    if record.get("format") != STRUCTURE_FORMAT:
        raise UserError(f"structure format {record.get('format')} is not supported by this lmslim")
    fam = family(model)
    _, blocks = transformer_blocks(model)
    if fam != record.get("family") or len(blocks) != len(record["layers"]):
        raise UserError("the lmslim_structure record does not match the model's architecture or layer count")
    for block, s in zip(blocks, record["layers"]):
        attn, mlp = attention(block), block.mlp
        h, kv, inter = s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]
        if fam == "llama":
            d = attn.head_dim
            hidden = linear_weight(attn.q_proj).shape[1]
            for name, out in (("q_proj", h * d), ("k_proj", kv * d), ("v_proj", kv * d)):
                old = getattr(attn, name)
                setattr(attn, name, new_linear_like(old, out, hidden, old.bias is not None))
            attn.o_proj = new_linear_like(attn.o_proj, hidden, h * d, attn.o_proj.bias is not None)
            attn.num_key_value_groups = h // kv
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                setattr(mlp, name, new_linear_like(old, inter, hidden, old.bias is not None))
            mlp.down_proj = new_linear_like(mlp.down_proj, hidden, inter, mlp.down_proj.bias is not None)
        else:
            d = attn.head_dim
            hidden = linear_weight(attn.c_attn).shape[1]
            attn.c_attn = new_linear_like(attn.c_attn, 3 * h * d, hidden, True)
            attn.c_proj = new_linear_like(attn.c_proj, hidden, h * d, True)
            attn.num_heads, attn.split_size = h, h * d
            mlp.c_fc = new_linear_like(mlp.c_fc, inter, hidden, True)
            mlp.c_proj = new_linear_like(mlp.c_proj, hidden, inter, True)
