import pytest
import torch

from lmslim.compress.quantize.scheme import Scheme, dequantize, fake_quantize, group_params, pack, quantize_weight, \
    unpack
from lmslim.core.errors import UserError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 2 ** bits, (37, 19), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == (37 * 19 * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, (37, 19)), codes)


@pytest.mark.parametrize("bits", [0, 5, 16])
def test_unsupported_bits(bits):
    with pytest.raises(UserError, match=f"unsupported bits {bits}"):
        Scheme(bits=bits)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128, None])
def test_round_to_nearest_error_is_at_most_half_a_step(symmetric, group):
    torch.manual_seed(0)
    w = torch.randn(24, 576)
    s = Scheme(4, group, symmetric)
    q, scale, zero = quantize_weight(w, s)
    assert q.max() <= 15
    err = (dequantize(q, scale, zero, s.group(576)) - w).abs()
    step = scale.repeat_interleave(s.group(576), 1)[:, :576]
    assert (err <= step / 2 + 1e-6).all()
    if symmetric:
        assert (zero == 8).all()


def test_partial_last_group_uses_only_its_columns():
    # 576 = 4*128 + 64: five groups, the last 64 columns wide.
    w = torch.randn(4, 576)
    w[:, 512:] *= 100
    scale, _ = group_params(w, Scheme(4, 128, True))
    assert scale.shape == (4, 5)
    assert (scale[:, 4] > 20 * scale[:, :4].max()).all()  # the big columns do not leak into other groups


def test_asymmetric_grid_is_exact_on_its_own_grid():
    # Weights already on a 4-bit asymmetric g32 grid (like SmolLM2's release) are reproduced exactly.
    torch.manual_seed(0)
    s = Scheme(4, 32, False)
    w = fake_quantize(torch.randn(8, 64), s)
    assert torch.allclose(fake_quantize(w, s), w, atol=1e-6)
