"""QuantEmbedding: lookups read exactly the dequantized table; a tied head shares the table's buffers."""

import pytest
import torch

from lmslim.nn.quant_embedding import QuantEmbedding, tied_heads
from lmslim.nn.quant_linear import QuantLinear
from lmslim.nn.scheme import Scheme, quantize_weight


@pytest.mark.parametrize("bits,group,dim", [(4, 8, 24), (8, None, 24), (3, 8, 24), (4, 16, 23)])  # 3x23: rows end mid-byte
def test_lookup_is_the_dequantized_table_row(bits, group, dim):
    table = torch.randn(50, dim, generator=torch.Generator().manual_seed(0))
    scheme = Scheme(bits, group)
    emb = QuantEmbedding.from_codes(*quantize_weight(table, scheme), scheme)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, dim)
    assert torch.equal(out, emb.dequantized_weight()[ids])
    assert (out - table[ids]).abs().max() < 0.5 * emb.scale.float().max() + 1e-6  # within half a step


def test_tied_head_reads_the_same_buffers():
    scheme = Scheme(4, 8, symmetric=True)
    emb = QuantEmbedding.from_codes(*quantize_weight(torch.randn(40, 16), scheme), scheme)
    head = QuantLinear(16, 40, scheme, False, "dequant")
    emb.tie(head)
    assert head.qweight is emb.qweight and head.scale is emb.scale and head.offset is emb.offset
    x = torch.randn(3, 16)
    assert torch.allclose(head(x), x @ emb.dequantized_weight().t(), atol=1e-5)
    model = torch.nn.ModuleDict({"embed": emb, "head": head})
    assert tied_heads(model) == {"head"}
    assert emb.cost_profile()["params"] == 0  # the head counts the table once
    with pytest.raises(ValueError):
        emb.tie(QuantLinear(16, 40, Scheme(8, None, True), False, "dequant"))  # another grid cannot share it
