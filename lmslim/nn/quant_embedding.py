"""The quantized token embedding: an integer table whose rows are dequantized when looked up.

A model's embedding table is a (vocab, hidden) matrix like any linear weight, quantized the same way
(``lmslim.nn.scheme``: groups along the hidden dimension, fp16 scale and offset per (row, group)).
On a large vocabulary it is most of the model: Gemma-3's 262k x 2560 table is 0.67 B of its 1 B
parameters, so a 4-bit model whose table stays fp32 shrinks by only ~1.5x.

A lookup reads only the rows it needs: when a row fills whole bytes, the packed codes are viewed as
(vocab, row_bytes) and only the gathered rows are unpacked.

When the model ties its LM head to the embedding (SmolLM2, Llama-3.2-1B), the head is a
``QuantLinear`` over the very same buffers (:meth:`QuantEmbedding.tie`), so the table is stored
once and the head multiplies by exactly the codes the lookup reads.

Example:
    >>> import torch
    >>> from lmslim.nn.quant_embedding import QuantEmbedding
    >>> from lmslim.nn.scheme import Scheme, quantize_weight
    >>> table = torch.randn(100, 16)
    >>> s = Scheme(bits=4, group_size=8)
    >>> emb = QuantEmbedding.from_codes(*quantize_weight(table, s), s)
    >>> emb(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from lmslim.nn.quant_linear import PackedCodes, QuantLinear
from lmslim.core.targeting import set_submodule
from lmslim.nn.scheme import Scheme, expand_groups, pack, unpack


class QuantEmbedding(PackedCodes, nn.Module):
    """``nn.Embedding`` with integer codes; ``out_features`` = vocabulary, ``in_features`` = hidden size."""

    bias = None  # the grid's readers (formats, exporters) treat it as a bias-free (vocab, hidden) matrix

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, padding_idx: int | None = None):
        super().__init__()
        self._register_grid(embedding_dim, num_embeddings, scheme)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.tied_head = False  # True when an LM head QuantLinear reads these same buffers (see tie)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: Scheme,
                   padding_idx: int | None = None) -> "QuantEmbedding":
        vocab, dim = codes.shape
        return cls.from_packed(pack(codes, scheme.bits), (vocab, dim), scale, offset, scheme, padding_idx)

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, shape: tuple[int, int], scale: torch.Tensor, offset: torch.Tensor,
                    scheme: Scheme, padding_idx: int | None = None) -> "QuantEmbedding":
        mod = cls(shape[0], shape[1], scheme, padding_idx)
        mod._set_grid(qweight, scale, offset)
        return mod

    def tie(self, head: QuantLinear) -> None:
        """Make ``head`` (an LM head of the same shape and grid) read this table's buffers."""
        if (head.out_features, head.in_features, head.scheme) != (self.out_features, self.in_features, self.scheme):
            raise ValueError("a tied LM head must have the embedding's shape and grid")
        head.qweight, head.scale, head.offset = self.qweight, self.scale, self.offset
        head.prepare()
        self.tied_head = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (N,)
        bits, dim = self.scheme.bits, self.embedding_dim
        if (dim * bits) % 8 == 0:  # each row is whole bytes: unpack only the rows looked up
            rows = self.qweight.view(self.num_embeddings, dim * bits // 8)[flat]  # (N, row_bytes)
            codes = unpack(rows.reshape(-1), bits, (flat.numel(), dim))  # (N, dim)
        else:
            codes = self.codes()[flat]
        g = self.scheme.group(dim)
        scale = expand_groups(self.scale[flat].float(), g, dim)  # (N, dim)
        offset = expand_groups(self.offset[flat].float(), g, dim)
        return (codes.float() * scale + offset).reshape(*ids.shape, dim)

    def cost_profile(self) -> dict[str, int]:
        """A lookup reads one row per token (no matmul); a tied head counts the table (see QuantLinear)."""
        params = 0 if self.tied_head else self.num_embeddings * self.embedding_dim
        return {"params": params, "nonzero": params, "weight_bytes": 0, "matmul_params": 0}

    def extra_repr(self) -> str:
        g = self.scheme.group_size or "channel"
        sym = "sym" if self.scheme.symmetric else "asym"
        tied = ", tied to the LM head" if self.tied_head else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, w{self.scheme.bits} g={g} {sym}{tied}"


def tied_heads(model: nn.Module) -> set[str]:
    """Names of the ``QuantLinear`` LM heads that read a ``QuantEmbedding``'s buffers (stored once, with the table)."""
    tables = {id(m.qweight) for m in model.modules() if isinstance(m, QuantEmbedding)}
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and id(m.qweight) in tables}


def retie_head(model: nn.Module, table: QuantEmbedding, spec: dict) -> None:
    """Rebuild the tied LM head a saved table's record names (``tied_head``, ``head_kernel``) over ``table``."""
    if not spec.get("tied_head"):
        return
    head = QuantLinear(table.in_features, table.out_features, table.scheme, False, spec["head_kernel"])
    table.tie(head)
    set_submodule(model, spec["tied_head"], head)
