"""Analytic cost model: FLOPs and bytes per token from a model's shapes.

Forward FLOPs for one sequence of T tokens::

    F(T) = 2 * N_lin * T  +  4 * L * T * T_ctx * H * D_head

where ``N_lin`` counts the weights of every matrix multiply (``nn.Linear``, GPT-2's ``Conv1D`` and
the LM head; embedding lookups cost no FLOPs), ``L`` layers, ``H`` query heads of width
``D_head``; the attention term is QKᵀ plus attention·V (2 multiply-adds each). Dense attention kernels
compute the full T×T score matrix even under a causal mask, so no ½ is applied for prefill. A decoded
token at context c costs ``2 * N_lin + 4 * L * c * H * D_head``. Training costs about 3× the forward
(backward ≈ 2× forward: gradients for activations and for weights), which gives the training cost
``C = k * m * (f(n) + g(n))`` for k epochs over m samples with forward f and backward g ≈ 2f.

Decode is memory-bound: every weight is read once per generated token, plus the KV cache, so
``bytes_read_per_token`` bounds decode speed at ``bandwidth / bytes_read_per_token``.

Non-zeros (``nonzero_params``) count exact zeros of the float parameters; in quantized layers only
when the model carries pruning provenance (see ``shape_of``), so rounding to a 4-bit grid is not
mistaken for sparsity.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.measure.cost import shape_of, forward_flops
    >>> m, _ = build_tiny("tiny-llama")
    >>> forward_flops(shape_of(m), 16) > 0
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    linear_params: int  # weights that take part in matrix multiplies, per token
    weight_bytes: int  # bytes read per decoded token for weights (embedding tables only when tied)
    params: int
    nonzero_params: int
    kv_bytes_per_token: int  # KV cache bytes one context token adds (all layers)


def _is_matmul_module(m: nn.Module) -> bool:
    # GPT-2's Conv1D is a Linear with a transposed weight; match by name to avoid importing it.
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _zero_bin(m: nn.Module) -> int:
    """Weights of a quantized layer that dequantize to within half a step of 0.0.

    A pruned zero lands there, but not always on exactly 0.0: an asymmetric grid stores its zero point
    as an fp16 offset, so the code for 0.0 dequantizes to a tiny non-zero value. The count also holds
    the small weights rounded there, a slight overstatement of the pruned fraction.
    """
    from lmslim.nn.scheme import expand_groups

    w = m.dequantized_weight()  # (out, in)
    step = expand_groups(m.scale.float(), m.scheme.group(m.in_features), m.in_features)  # (out, in)
    return int((w.abs() <= step / 2).sum().item())


def shape_of(model: nn.Module) -> ModelShape:
    """Read the cost-relevant shape of a transformers model."""
    cfg = model.config
    get = lambda *keys, default=None: next((getattr(cfg, k) for k in keys if getattr(cfg, k, None)), default)  # noqa: E731
    n_layers = int(get("num_hidden_layers", "n_layer", default=0))
    n_heads = int(get("num_attention_heads", "n_head", default=1))
    hidden = int(get("hidden_size", "n_embd", "d_model", default=0))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_heads)
    n_kv = int(get("num_key_value_heads", default=n_heads))

    matmul_ptrs: set[int] = set()
    linear_params = 0
    # Compressed layers (e.g. QuantLinear) keep their weights in buffers and describe their own cost.
    profiles = [m.cost_profile() for m in model.modules() if hasattr(m, "cost_profile")]
    weight_bytes = 0
    for mod in model.modules():
        if _is_matmul_module(mod):
            linear_params += mod.weight.numel()
            # Bytes count per use: a weight shared by several layers (lmslim.compress.share) is read
            # again by each layer during decode; only the parameter count below dedupes it.
            weight_bytes += _tensor_bytes(mod.weight)
            matmul_ptrs.add(mod.weight.data_ptr())
    linear_params += sum(p["matmul_params"] for p in profiles)
    embedding_ptrs = {mod.weight.data_ptr() for mod in model.modules() if isinstance(mod, nn.Embedding)}

    seen: set[int] = set()
    params = nonzero = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue  # tied or shared weights count once
        seen.add(p.data_ptr())
        params += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
        # A lookup reads one row of an embedding table; a tied LM head reads all of it (counted above).
        if p.data_ptr() not in embedding_ptrs and p.data_ptr() not in matmul_ptrs:
            weight_bytes += _tensor_bytes(p)
    params += sum(p["params"] for p in profiles)
    # A quantizer maps every weight near zero to the code nearest 0.0 (at 4 bits, 5-20% of a matrix),
    # so zeros in the dequantized codes are rounding, not removed weights. They count as sparsity only
    # when the model was pruned before it was quantized (``lmslim_pruning`` provenance).
    nonzero += sum(p["params"] for p in profiles)
    if getattr(cfg, "lmslim_pruning", None):
        # (matmul layers only: pruning leaves embedding tables dense, and a tied table is its head's codes)
        from lmslim.nn.quant_embedding import QuantEmbedding

        nonzero -= sum(_zero_bin(m) for m in model.modules()
                       if hasattr(m, "cost_profile") and not isinstance(m, QuantEmbedding))
    weight_bytes += sum(p["weight_bytes"] for p in profiles)
    elem = next(model.parameters()).element_size()
    kv = 2 * n_layers * n_kv * head_dim * elem
    return ModelShape(n_layers, n_heads, n_kv, head_dim, linear_params, weight_bytes, params, nonzero, kv)


def attention_flops(shape: ModelShape, queries: int, keys: int) -> int:
    """QKᵀ and attention·V for ``queries`` query positions over ``keys`` key positions."""
    return 4 * shape.n_layers * queries * keys * shape.n_heads * shape.head_dim


def forward_flops(shape: ModelShape, seq_len: int, batch: int = 1) -> int:
    """FLOPs of one forward pass over ``batch`` sequences of ``seq_len`` tokens."""
    return batch * (2 * shape.linear_params * seq_len + attention_flops(shape, seq_len, seq_len))


def flops_per_token(shape: ModelShape, context: int) -> int:
    """FLOPs to decode one token with ``context`` tokens in the KV cache."""
    return 2 * shape.linear_params + attention_flops(shape, 1, context + 1)


def training_flops_per_token(shape: ModelShape, seq_len: int) -> int:
    """≈ 3× forward: backward computes gradients for both activations and weights."""
    return 3 * forward_flops(shape, seq_len) // seq_len


def training_cost(forward: float, samples: int, epochs: int = 1, backward: float | None = None) -> float:
    """C = k · m · (f(n) + g(n)); ``g`` defaults to 2·f (the usual backward/forward ratio)."""
    g = 2 * forward if backward is None else backward
    return epochs * samples * (forward + g)


def bytes_read_per_token(shape: ModelShape, context: int) -> int:
    """Bytes a decode step reads: every weight once plus the KV cache of ``context`` tokens."""
    return shape.weight_bytes + shape.kv_bytes_per_token * context
