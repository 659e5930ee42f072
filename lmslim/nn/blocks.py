"""Finding and rebuilding the parts of a transformer: the block list, its family, linear modules.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.nn.blocks import family, transformer_blocks
    >>> model, _ = build_tiny("tiny-llama")
    >>> transformer_blocks(model)[0], family(model)
    ('model.layers', 'llama')
"""

from __future__ import annotations

import torch
from torch import nn

from lmslim.core.errors import UserError

_BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "encoder.layer",
                "bert.encoder.layer")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks and its dotted path."""
    for path in _BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    raise UserError(f"{type(model).__name__}: no list of transformer blocks found (looked at {', '.join(_BLOCK_PATHS)})")


def family(model: nn.Module) -> str | None:
    """``llama`` (q/k/v/o + gate/up/down), ``gpt2`` (c_attn/c_proj + c_fc/c_proj) or None."""
    _, blocks = transformer_blocks(model)
    b = blocks[0]
    attn, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
    if attn is not None and mlp is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
            and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "llama"
    attn = getattr(b, "attn", None)
    if attn is not None and hasattr(attn, "c_attn") and mlp is not None and hasattr(mlp, "c_fc"):
        return "gpt2"
    return None


def attention(block: nn.Module) -> nn.Module:
    """The attention module of a Llama-style (``self_attn``) or GPT-2 (``attn``) block."""
    return getattr(block, "self_attn", None) or block.attn


def new_linear_like(like: nn.Module, out: int, inp: int, bias: bool) -> nn.Module:
    """An uninitialised Linear/Conv1D of shape (out, in), same kind and dtype as ``like``."""
    dtype = like.weight.dtype
    if type(like).__name__ == "Conv1D":
        new = type(like).__new__(type(like))
        nn.Module.__init__(new)
        new.nf, new.nx = out, inp
        new.weight = nn.Parameter(torch.empty(inp, out, dtype=dtype))  # Conv1D stores (in, out)
        new.bias = nn.Parameter(torch.empty(out, dtype=dtype)) if bias else None
        return new
    return nn.utils.skip_init(nn.Linear, inp, out, bias=bias, dtype=dtype)
