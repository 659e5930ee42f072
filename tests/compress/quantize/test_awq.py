import json

import pytest
import torch

from lmslim.assets.tiny import build_tiny
from lmslim.compress.calibration import capture_block_inputs, run_block, transformer_blocks
from lmslim.compress.quantize import AWQConfig, GPTQConfig, RTNConfig, quantize_
from lmslim.compress.quantize.awq import awq_scale_block_, collect_stats, search_scale
from lmslim.nn.scheme import Scheme, fake_quantize
from lmslim.modelio.formats.lmslim_quantized import save_quantized
from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.core.targeting import is_linear_like


def _outlier_inputs(n=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)
    x[:, :6] *= 20  # a few strong channels, as after RMSNorm in real LMs
    return x


@torch.no_grad()
def test_hessian_error_equals_output_error_of_scaled_fake_quant_reference():
    x = _outlier_inputs()
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    scheme = Scheme(4, 32, False)
    s, err, base = search_scale([w], x.t() @ x / x.shape[0], x.abs().mean(0), scheme, grid=10)
    # Plain-PyTorch reference: the layer really computes (x / s) @ fake_quant(w * s)ᵀ.
    out = (x / s) @ fake_quantize(w * s, scheme).t()
    ref_err = ((x @ w.t() - out) ** 2).sum().item() / x.shape[0]
    assert err == pytest.approx(ref_err, rel=1e-3)
    base_ref = ((x @ w.t() - x @ fake_quantize(w, scheme).t()) ** 2).sum().item() / x.shape[0]
    assert base == pytest.approx(base_ref, rel=1e-3)


@torch.no_grad()
def test_scale_search_beats_rtn_on_outlier_channels():
    x = _outlier_inputs()
    ws = [torch.randn(64, 128, generator=torch.Generator().manual_seed(i)) for i in (2, 3)]
    s, err, base = search_scale(ws, x.t() @ x / x.shape[0], x.abs().mean(0), Scheme(4, 32, False), grid=20)
    assert err < 0.9 * base
    assert s[:6].mean() > s[6:].mean()  # the strong channels are the ones scaled up


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_folded_scales_leave_the_full_precision_block_unchanged(name):
    model, _ = build_tiny(name)
    model.config.use_cache = False
    path, blocks = transformer_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], torch.randint(10, 200, (4, 32)), 2)
    before = [run_block(blocks[0], i) for i in inputs]
    mods = {f"{path}.0.{n}": m for n, m in blocks[0].named_modules() if is_linear_like(m)}
    stats = collect_stats(blocks[0], mods, inputs)
    records = awq_scale_block_(blocks[0], f"{path}.0", mods, stats, Scheme(4, 16, False), grid=10)
    assert len(records) == (3 if name == "tiny-llama" else 2)
    assert all(r["error"] <= r["unscaled_error"] for r in records)
    after = [run_block(blocks[0], i) for i in inputs]
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # The updated Hessians are those of the scaled inputs.
    fresh = collect_stats(blocks[0], mods, inputs)
    for n in mods:
        assert torch.allclose(stats.hessian[n], fresh.hessian[n], rtol=1e-3, atol=1e-5)


@torch.no_grad()
def test_awq_model_error_not_worse_than_rtn_on_tiny_model():
    calib = torch.randint(10, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    ref, _ = build_tiny("tiny-llama")
    logits = ref(calib).logits
    errs = {}
    for key, cfg in {"rtn": RTNConfig(bits=3, group_size=32, kernel="dequant"),
                     "awq": AWQConfig(bits=3, group_size=32, kernel="dequant")}.items():
        model, _ = build_tiny("tiny-llama")
        quantize_(model, cfg, calib)
        errs[key] = ((model(calib).logits - logits) ** 2).mean().item()
    assert errs["awq"] <= errs["rtn"] * 1.05


def test_awq_and_gptq_awq_end_to_end_reload_bit_identical(tmp_path):
    calib = torch.randint(10, 200, (6, 32))
    ids = torch.randint(10, 200, (2, 16))
    for i, cfg in enumerate([AWQConfig(bits=4, group_size=32), GPTQConfig(bits=4, group_size=32, awq=True),
                             GPTQConfig(bits=4, group_size=32, awq=True, true_sequential=True)]):
        model, tok = build_tiny("tiny-llama")
        report = quantize_(model, cfg, calib)
        assert report["modules"] == 14
        assert report.get("scaled_groups", report.get("awq_scaled_groups")) == 6
        save_quantized(model, tok, tmp_path / str(i))
        reloaded = load_model(str(tmp_path / str(i))).model
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_awq_config_errors():
    with pytest.raises(UserError):
        AWQConfig(bits=5)
    with pytest.raises(UserError):
        AWQConfig(grid=0)
    with pytest.raises(UserError):
        GPTQConfig(awq_grid=0)
    with pytest.raises(UserError, match="needs calibration"):
        quantize_(build_tiny("tiny-llama")[0], AWQConfig())


def test_cli_awq_method_and_gptq_flag(tmp_path, capsys):
    from lmslim.cli.main import main

    (tmp_path / "calib.txt").write_text("Calibration text about many things. " * 200)
    for method, extra in (("awq", []), ("gptq", ["--awq"])):
        out = tmp_path / method
        code = main(["quantize", "builtin:tiny-llama", "--method", method, "--bits", "4", "--group-size", "32",
                     "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--seq-len", "32",
                     "--out", str(out), *extra])
        assert code == 0, capsys.readouterr().err
        cfg = json.loads((out / "config.json").read_text())["lmslim_quantization"]
        assert cfg["method"] == method
        assert method == "awq" or cfg["config"]["awq"] is True
