"""Embedding-width pruning: remove channels of the residual stream (the hidden size) everywhere.

A residual-stream channel c lives in the token embedding's column c, the LM head's column c, the
RMSNorm weights' entry c, every matrix that reads the stream (q/k/v, gate/up: input column c) and
every matrix that writes it (o_proj, down_proj: output row c). Removing it shrinks all of them, so
the whole model gets cheaper, including the embedding table and the LM head that the other
structured methods leave alone.

Importance of channel c: the sum over the inputs of every decoder layer and the final norm of the
channel's RMS over the calibration tokens (the residual stream's magnitude; LLMs route a few
"massive activation" channels through every layer, and those are kept first).

RMSNorm divides by the root-mean-square over the channels, so with H' of H channels left every norm
weight is multiplied by √(H/H'): the normalisation is then unchanged where the removed channels
were zero, and compensates for their average energy otherwise. This is width pruning of the
embedding dimension as in Minitron (Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", https://arxiv.org/abs/2407.14679), which also scores channels by their
activations and then recovers by distillation; recovery here is the training engine's job.

Llama-style models only (RMSNorm, no position-embedding table). The result has uniform shapes: the
config's ``hidden_size`` changes (``head_dim`` stays explicit) and plain ``transformers`` loads it.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.prune import prune_
    >>> from lmslim.compress.prune.width import WidthConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> _ = prune_(model, WidthConfig(fraction=0.25), torch.randint(10, 200, (2, 16)))
    >>> model.config.hidden_size
    48
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmslim.compress.prune.api import PRUNERS
from lmslim.compress.prune.structured import _StructSpec, _calibrate, _complement, _select, round_half_up
from lmslim.core.errors import UserError
from lmslim.nn.blocks import attention, family, transformer_blocks


@dataclass(frozen=True)
class WidthConfig(_StructSpec):
    """Remove ``fraction`` of the hidden (embedding) channels, rounded half up."""

    fraction: float = 0.25

    def __post_init__(self) -> None:
        self._check_struct(self.fraction)
        if self.scope != "layer":
            raise UserError("width pruning has one hidden size for the whole model: scope must be layer")


def _final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    if norm is None or not hasattr(norm, "weight"):
        raise UserError(f"{type(model).__name__}: width pruning needs a final norm at model.norm")
    return norm


@torch.no_grad()
def channel_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(H,) summed per-channel RMS of the residual stream entering every block and the final norm."""
    _, blocks = transformer_blocks(model)
    points = list(blocks) + [_final_norm(model)]
    hidden = model.get_input_embeddings().weight.shape[1]
    sq = torch.zeros(len(points), hidden, dtype=torch.float64)
    count = [0] * len(points)

    def hook(i):
        def fn(_mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, hidden).double()  # (N, H)
            sq[i] += (x * x).sum(0)
            count[i] += x.shape[0]
        return fn

    handles = [p.register_forward_pre_hook(hook(i), with_kwargs=True) for i, p in enumerate(points)]
    try:
        _calibrate(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return (sq / torch.tensor(count, dtype=torch.float64).clamp_min(1).unsqueeze(1)).sqrt().sum(0).float()


def shrink_width(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep residual channels ``keep`` (sorted) in every tensor that touches the stream."""
    hidden = model.get_input_embeddings().weight.shape[1]
    scale = (hidden / len(keep)) ** 0.5  # RMS over H' channels instead of H (see the module docstring)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    emb = model.get_input_embeddings()
    new_emb = nn.Embedding(emb.num_embeddings, len(keep), padding_idx=emb.padding_idx, dtype=emb.weight.dtype)
    new_emb.weight.data.copy_(emb.weight.data[:, keep])
    head = model.get_output_embeddings()
    model.set_input_embeddings(new_emb)
    if head is not None:
        if tied:
            new_head = nn.Linear(len(keep), head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
            new_head.weight = new_emb.weight
            if head.bias is not None:
                new_head.bias.data.copy_(head.bias.data)
        else:
            new_head = _select(head, in_idx=keep)
        model.set_output_embeddings(new_head)

    def norm_(norm: nn.Module) -> None:
        norm.weight = nn.Parameter(norm.weight.data[keep] * scale)
        if getattr(norm, "bias", None) is not None:
            raise UserError("width pruning supports RMSNorm without bias only")

    _, blocks = transformer_blocks(model)
    for block in blocks:
        attn, mlp = attention(block), block.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _select(getattr(attn, name), in_idx=keep))
        attn.o_proj = _select(attn.o_proj, out_idx=keep)
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, _select(getattr(mlp, name), in_idx=keep))
        mlp.down_proj = _select(mlp.down_proj, out_idx=keep)
        norm_(block.input_layernorm)
        norm_(block.post_attention_layernorm)
    norm_(_final_norm(model))
    cfg = model.config
    cfg.head_dim = attention(blocks[0]).head_dim  # explicit: hidden / heads no longer gives it
    cfg.hidden_size = len(keep)


@PRUNERS.register("width", WidthConfig)
def _width(model, config: WidthConfig, calib: torch.Tensor) -> dict:
    _, blocks = transformer_blocks(model)
    if family(model) != "llama" or not all(hasattr(b, n) for b in blocks
                                           for n in ("input_layernorm", "post_attention_layernorm")):
        raise UserError(f"{type(model).__name__}: width pruning supports Llama-style models (RMSNorm, "
                        "q/k/v/o and gate/up/down projections) only")
    if getattr(model.config, "lmslim_structure", None):
        raise UserError("prune the width before heads/neurons with per-layer (global-scope) shapes")
    hidden = model.get_input_embeddings().weight.shape[1]
    k = round_half_up(config.fraction * hidden)
    if k == 0:
        raise UserError(f"removing {config.fraction:g} of {hidden} channels rounds to none; ask for more")
    if k >= hidden:
        raise UserError(f"cannot remove {k} of the {hidden} hidden channels: at least one must stay")
    scores = channel_scores(model, calib, config.batch_size)
    removed = scores.argsort()[:k].sort().values
    shrink_width(model, _complement(removed, hidden))
    return {"hidden_before": hidden, "hidden_after": hidden - k, "removed_fraction": k / hidden,
            "criterion": "sum over layers of the residual channel's RMS; norm weights scaled by sqrt(H/H')"}
