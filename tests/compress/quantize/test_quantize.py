import json

import pytest
import torch
import torch.nn.functional as F

from lmslim.assets.tiny import build_tiny
from lmslim.compress.calibration import capture_block_inputs, run_block, transformer_blocks
from lmslim.compress.quantize import DynamicInt8Config, GPTQConfig, RTNConfig, quantize_
from lmslim.compress.quantize.gptq import gptq_quantize
from lmslim.nn.quant_linear import QuantLinear, fbgemm_saturates
from lmslim.nn.scheme import Scheme, dequantize, fake_quantize, quantize_weight
from lmslim.modelio.formats.lmslim_quantized import save_quantized
from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.measure import cost


def _emulated_w8a8(x, w, bias):
    """Reference: per-token asymmetric 8-bit activations × int8 per-channel symmetric weights."""
    s_w = w.abs().amax(1, keepdim=True) / 127
    w8 = torch.round(w / s_w).clamp(-127, 127) * s_w
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 255
    z = torch.round(-lo / s)
    xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    return xq @ w8.t() + bias


@torch.no_grad()
@pytest.mark.parametrize("scheme", [Scheme(8, None, True), Scheme(4, 32, False), Scheme(4, 48, True),
                                    Scheme(3, 16, False)])
def test_dequant_kernel_matches_fake_quant_reference(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = QuantLinear.from_codes(*quantize_weight(lin.weight, scheme), scheme, lin.bias, kernel="dequant")
    x = torch.randn(3, 7, 96)
    ref = F.linear(x, fake_quantize(lin.weight, scheme), lin.bias)
    assert torch.allclose(q(x), ref, atol=1e-5)


def _emulated_fbgemm(x, w, bias, qmax):
    """Reference for the fbgemm path: each row mapped affinely onto [-1, 1], one grid of qmax+1 codes
    over the whole (mapped) input, int8 per-channel symmetric weights."""
    s_w = w.abs().amax(1, keepdim=True) / 127
    w8 = torch.round(w / s_w).clamp(-127, 127) * s_w
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    xn = (x - mid) / half
    s = 2.0 / qmax
    z = round(1.0 / s)
    xq = (torch.clamp(torch.round(xn / s) + z, 0, qmax) - z) * s
    return (xq * half + mid) @ w8.t() + bias


def _outlier_case(kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    scheme = Scheme(8, None, True)
    q = QuantLinear.from_codes(*quantize_weight(lin.weight, scheme), scheme, lin.bias, kernel=kernel)
    x = torch.randn(5, 96) + 0.3
    x[:, 7] *= 20  # an outlier channel: activations span the whole grid
    return q, x, lin.bias


@torch.no_grad()
def test_int8_kernel_is_exact_w8a8():
    q, x, bias = _outlier_case("int8")
    ref = _emulated_w8a8(x, q.dequantized_weight(), bias)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 1e-5


@torch.no_grad()
def test_fbgemm_kernel_matches_its_grid_without_int16_overflow():
    q, x, bias = _outlier_case("fbgemm")
    qmax = 127 if fbgemm_saturates() else 255  # 7-bit activations where 8-bit pair sums overflow int16
    ref = _emulated_fbgemm(x, q.dequantized_weight(), bias, qmax)
    # fbgemm rounds its range and zero point its own way: close to the emulated grid, never the
    # ~20% error an overflowing int16 accumulator gives on this input.
    assert ((q(x) - ref).norm() / ref.norm()).item() < 2e-2
    assert ((q(x) - _emulated_w8a8(x, q.dequantized_weight(), bias)).norm() / ref.norm()).item() < 6e-2


@torch.no_grad()
def test_fbgemm_worst_case_products_are_exact():
    """Every activation code at the top of the grid times weight code 127: the sum must be exact."""
    lin = torch.nn.Linear(64, 8, bias=False)
    lin.weight.data.fill_(1.0)
    scheme = Scheme(8, None, True)
    q = QuantLinear.from_codes(*quantize_weight(lin.weight, scheme), scheme, None, kernel="fbgemm")
    x = torch.ones(2, 64)
    x[:, 0] = 0.0
    assert torch.allclose(q(x), torch.full((2, 8), 63.0), rtol=2e-2)


@torch.no_grad()
def test_per_token_activation_scales_isolate_outlier_tokens():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = QuantLinear.from_codes(*quantize_weight(lin.weight, Scheme(8, None, True)), Scheme(8, None, True), None,
                               kernel="int8")
    x = torch.randn(2, 64)
    alone = q(x[1:2])
    x[0] *= 1000  # a huge token next to a normal one must not change the normal one's result
    assert torch.allclose(q(x)[1:2], alone, atol=1e-6)


def test_dynamic_int8_covers_gpt2_conv1d_and_skips_lm_head():
    model, _ = build_tiny("tiny-gpt2")
    report = quantize_(model, DynamicInt8Config())
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert report["modules"] == 8 and all(".attn." in n or ".mlp." in n for n in quant)
    assert type(model.lm_head).__name__ == "Linear"


def test_include_lm_head_unties_and_keeps_embedding():
    model, _ = build_tiny("tiny-llama")
    emb = model.get_input_embeddings().weight.detach().clone()
    quantize_(model, RTNConfig(bits=8, group_size=None, symmetric=True, include_lm_head=True))
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert model.config.tie_word_embeddings is False


@torch.no_grad()
def test_gptq_beats_rtn_on_layer_reconstruction():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    # Correlated inputs with a few strong channels, like real activations.
    x = torch.randn(2048, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(2048, 128)
    x[:, :4] *= 10
    h = 2 * x.t() @ x / x.shape[0]
    scheme = Scheme(4, 32, False)

    def err(codes, scale, offset):
        d = w - dequantize(codes, scale, offset, 32)
        return torch.trace(d @ h @ d.t()).item()

    rtn = err(*quantize_weight(w, scheme))
    assert err(*gptq_quantize(w, h, scheme)) < 0.7 * rtn
    assert err(*gptq_quantize(w, h, scheme, act_order=True)) < 0.7 * rtn


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_sequential_block_inputs_match_the_model(name):
    model, _ = build_tiny(name)
    model.config.use_cache = False
    ids = torch.randint(10, 200, (3, 24))
    path, blocks = transformer_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], ids, batch_size=2)
    hidden = model(ids, output_hidden_states=True).hidden_states
    x = torch.cat([i.hidden for i in inputs])
    assert torch.allclose(x, hidden[0])
    outs = torch.cat([run_block(blocks[0], i) for i in inputs])
    assert torch.allclose(outs, hidden[1], atol=1e-5)


def test_gptq_end_to_end_and_reload_bit_identical(tmp_path):
    model, tok = build_tiny("tiny-llama")
    calib = torch.randint(10, 200, (6, 32))
    report = quantize_(model, GPTQConfig(bits=3, group_size=48, include_lm_head=True), calib)
    assert report["modules"] == 15 and report["rtn_modules"] == ["lm_head"]
    save_quantized(model, tok, tmp_path)
    reloaded = load_model(str(tmp_path)).model
    ids = torch.randint(10, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    cfg = json.loads((tmp_path / "config.json").read_text())["lmslim_quantization"]
    assert cfg["method"] == "gptq" and cfg["format"] == 2
    assert cfg["modules"]["model.layers.0.mlp.down_proj"]["group_size"] == 48


def test_quantized_size_and_cost_accounting(tmp_path):
    model, tok = build_tiny("tiny-llama")
    dense = cost.shape_of(model)
    quantize_(model, RTNConfig(bits=4, group_size=32, kernel="dequant"))
    shape = cost.shape_of(model)
    assert shape.params == dense.params and shape.linear_params == dense.linear_params  # logical counts kept
    assert shape.weight_bytes < dense.weight_bytes
    save_quantized(model, tok, tmp_path)
    q = model.model.layers[0].mlp.up_proj
    assert q.qweight.numel() == 176 * 64 * 4 // 8  # densely packed 4-bit codes


def test_errors():
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(UserError, match="no eligible layers"):
        quantize_(model, RTNConfig(targets=("nothing.*",)))
    quantize_(model, RTNConfig())
    with pytest.raises(UserError, match="already quantized"):
        quantize_(model, RTNConfig())
    with pytest.raises(UserError, match="needs calibration"):
        quantize_(build_tiny("tiny-llama")[0], GPTQConfig())
    with pytest.raises(UserError, match="unknown kernel"):
        RTNConfig(kernel="cuda-magic")


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_smoothing_preserves_the_function(name):
    from lmslim.compress.quantize.smoothquant import _GROUPS, _family, smooth_

    model, _ = build_tiny(name)
    ids = torch.randint(10, 200, (2, 16))
    ref = model(ids).logits
    _, blocks = transformer_blocks(model)
    groups = 0
    for block in blocks:
        for prod, cons in _GROUPS[_family(block)]:
            consumers = [block.get_submodule(c) for c in cons]
            width = consumers[0].weight.shape[0 if type(consumers[0]).__name__ == "Conv1D" else 1]
            smooth_(block.get_submodule(prod), consumers, torch.rand(width) * 50 + 0.1, alpha=0.5)
            groups += 1
    assert groups == (6 if name == "tiny-llama" else 4)
    assert torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_smoothquant_reduces_error_on_outlier_channels():
    from lmslim.compress.quantize import SmoothQuantConfig

    torch.manual_seed(0)
    base, _ = build_tiny("tiny-llama")
    with torch.no_grad():  # plant activation outliers: large RMSNorm gains on a few channels
        for layer in base.model.layers:
            layer.input_layernorm.weight[:3] = 40.0
            layer.post_attention_layernorm.weight[:3] = 40.0
    ids = torch.randint(10, 200, (8, 32))
    with torch.no_grad():
        ref = base(ids).logits

    def rel_err(cfg):
        model, _ = build_tiny("tiny-llama")
        model.load_state_dict(base.state_dict())
        quantize_(model, cfg, ids)
        with torch.no_grad():
            return ((model(ids).logits - ref).norm() / ref.norm()).item()

    assert rel_err(SmoothQuantConfig(alpha=0.5)) < rel_err(DynamicInt8Config())


def test_gptq_on_the_signed_16_code_grid_uses_code_zero():
    """signed_scale (ggml's Q4_0 rule): the signed largest weight of each group lands on code 0 (-8 in ggml)."""
    from lmslim.assets.tiny import build_tiny
    from lmslim.compress.quantize import GPTQConfig, quantize_
    from lmslim.nn.quant_linear import QuantLinear

    calib = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    codes = {}
    for signed in (False, True):
        model, _ = build_tiny("tiny-llama")
        quantize_(model, GPTQConfig(bits=4, group_size=16, symmetric=True, signed_scale=signed, kernel="dequant"), calib)
        mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert all(m.scheme.signed_scale == signed for m in mods)
        codes[signed] = torch.cat([m.codes().flatten() for m in mods])
    # max|w|/7 leaves code 0 to weights GPTQ's error feedback pushed past the group's range; the signed
    # rule puts a weight of every group there
    zeros = {k: int((c == 0).sum()) for k, c in codes.items()}
    assert zeros[True] > 3 * max(zeros[False], 1)
