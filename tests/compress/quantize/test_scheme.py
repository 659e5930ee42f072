import pytest
import torch

from lmslim.nn.scheme import Scheme, dequantize, fake_quantize, group_params, pack, quantize_weight, \
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
    q, scale, offset = quantize_weight(w, s)
    assert q.max() <= 15
    err = (dequantize(q, scale, offset, s.group(576)) - w).abs()
    step = scale.repeat_interleave(s.group(576), 1)[:, :576]
    # Half a step, plus the fp16 rounding of the stored offset for asymmetric grids.
    slack = 1e-6 if symmetric else offset.abs().repeat_interleave(s.group(576), 1)[:, :576] * 2 ** -10
    assert (err <= step / 2 + slack + 1e-6).all()
    if symmetric:
        assert torch.equal(offset, -8 * scale)


def test_partial_last_group_uses_only_its_columns():
    # 576 = 4*128 + 64: five groups, the last 64 columns wide.
    w = torch.randn(4, 576)
    w[:, 512:] *= 100
    scale, _ = group_params(w, Scheme(4, 128, True))
    assert scale.shape == (4, 5)
    assert (scale[:, 4] > 20 * scale[:, :4].max()).all()  # the big columns do not leak into other groups


def test_asymmetric_grid_is_exact_on_its_own_grid():
    # Weights already on a 4-bit "scale + min" g32 grid with fp16 parameters (llama.cpp's Q4_1, the
    # layout of SmolLM2's release) are reproduced exactly.
    torch.manual_seed(0)
    s = Scheme(4, 32, False, minmax=True)
    w = fake_quantize(torch.randn(8, 64) + 0.5, s)
    assert torch.equal(fake_quantize(w, s), w)


def test_asymmetric_grid_need_not_include_zero():
    w = torch.rand(2, 32) + 5.0  # all-positive groups use the whole code range for [min, max]
    s = Scheme(4, 32, False, minmax=True)
    step = (w.amax(1) - w.amin(1)) / 15
    assert ((fake_quantize(w, s) - w).abs().amax(1) <= step / 2 + 1e-2 * step).all()


def test_zero_point_grid_represents_zero_exactly():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    w[:, ::5] = 0.0
    fq = fake_quantize(w, Scheme(4, 32, False))
    # Exact up to the fp16 rounding of the stored offset (far below one step).
    assert (fq[:, ::5].abs() <= 1e-3 * w.abs().amax()).all()
