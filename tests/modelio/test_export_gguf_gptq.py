"""GPTQ and AWQ on GGUF's own grids (q5_0, k-quants, mixes): the file holds exactly what the method chose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmslim.compress.export import ExportConfig, export_, gptq_on_grid
from lmslim.core.errors import UserError
from lmslim.modelio.export.gguf import _rope_rows
from lmslim.modelio.export.gguf_blocks import TypeGrid, type_grid
from tests.modelio.test_export_gguf import read, tiny_llama


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 3) @ mix  # (n, k), uneven and correlated


def _err(w, values, x):
    return float(((x @ (w - values).T) ** 2).sum())


def test_gptq_on_a_fixed_grid_is_lmslims_gptq_where_both_can_express_the_grid():
    from lmslim.compress.quantize.gptq import gptq_quantize
    from lmslim.nn.scheme import Scheme, expand_groups, group_params

    w = torch.randn(16, 128) * 0.05
    x = _correlated_inputs(256, 128)
    h = x.T @ x / 256
    scheme = Scheme(4, 32, symmetric=False)
    ref_codes, scale, offset = gptq_quantize(w, h, scheme, damp=0.1, act_order=True)  # static groups, act-order
    assert torch.equal(scale, group_params(w, scheme)[0])
    step, off = expand_groups(scale, 32, 128), -expand_groups(offset, 32, 128)
    grid = TypeGrid("q4_1", step, off, 0, 15, torch.zeros(16, 128, dtype=torch.int32), (scale, offset))
    assert torch.equal(gptq_on_grid(w, h, grid), ref_codes.to(torch.int32))


@pytest.mark.parametrize("kind", ["q4_k", "q3_k", "q2_k", "q6_k", "q5_k", "q5_0", "q5_1", "q8_0"])
def test_gptq_codes_sit_on_the_types_grid_beat_rtn_and_pack_exactly(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    torch.manual_seed(0)
    w = torch.randn(32, 512) * 0.05
    x = _correlated_inputs(1024, 512)
    grid = type_grid(w, kind)
    codes = gptq_on_grid(w, x.T @ x / len(x), grid)
    assert grid.qmin <= int(codes.min()) and int(codes.max()) <= grid.qmax
    values = grid.values(codes)
    assert _err(w, values, x) < 0.9 * _err(w, grid.values(grid.codes), x)  # GPTQ vs RTN, same grid
    raw, packed = grid.encode(codes)
    assert np.array_equal(packed, values.numpy())
    assert np.array_equal(dequantize(raw, GGMLQuantizationType[kind.upper()]), values.numpy())
    rtn_raw, rtn_values = grid.encode(grid.codes)  # the writer's own RTN bytes for this tensor
    from lmslim.modelio.export.gguf_kquants import quantize_float

    if kind not in ("q8_0",):
        assert np.array_equal(rtn_raw, quantize_float(w.numpy(), kind))


def _calib(n=8, t=48, seed=0):
    return torch.randint(3, 250, (n, t), generator=torch.Generator().manual_seed(seed))


def _file_values(path):
    from gguf.quants import dequantize

    _, tensors = read(path)
    return {n: (t.tensor_type.name.lower(), dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist()))
            for n, t in tensors.items()}


def _layer0_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Inputs (tokens, in) of block 0's q_proj and down_proj in the float model."""
    seen = {}
    mlp = model.model.layers[0].mlp

    def keep(name):
        def hook(_mod, args):
            seen.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [m.register_forward_pre_hook(keep(k)) for k, m in (("attn_q", model.model.layers[0].self_attn.q_proj), ("ffn_down", mlp.down_proj))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_m"])
def test_gptq_export_writes_gptqs_own_values_and_beats_rtn_on_calibration_data(tmp_path, mix):
    ids = _calib()
    ref, tok = tiny_llama(hidden=256, ff=256, init=0.08)
    inputs = _layer0_inputs(ref, ids)
    model, _ = tiny_llama(hidden=256, ff=256, init=0.08)
    report = export_(model, tok, ExportConfig(format="gguf", type=mix, method="gptq"), tmp_path / "g.gguf", ids)
    assert report["gptq_matrices"] == 14 and report["gptq_error_vs_rtn_mean"] < 1
    export_(ref, tok, ExportConfig(format="gguf", type=mix), tmp_path / "r.gguf")
    gptq, rtn = _file_values(tmp_path / "g.gguf"), _file_values(tmp_path / "r.gguf")
    kinds = {gptq[n][0] for n in gptq}
    assert {"q4_k", "q6_k"} <= kinds if mix == "q4_k_m" else {"q3_k", "q4_k", "q5_k"} <= kinds
    rows = {"attn_q": _rope_rows(256, 4), "attn_k": _rope_rows(128, 2)}
    for i, layer in enumerate(model.model.layers):  # every block matrix: the file holds GPTQ's values bit for bit
        a, m = layer.self_attn, layer.mlp
        for name, mod in (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj), ("attn_output", a.o_proj),
                          ("ffn_gate", m.gate_proj), ("ffn_up", m.up_proj), ("ffn_down", m.down_proj)):
            w = mod.weight.data
            w = w[rows[name]] if name in rows else w
            kind, values = gptq[f"blk.{i}.{name}.weight"]
            assert kind == rtn[f"blk.{i}.{name}.weight"][0]
            assert np.array_equal(values, w.numpy()), (i, name)
    for name in ("attn_q", "ffn_down"):  # same float inputs for block 0: GPTQ's output error is lower
        w = getattr(ref.model.layers[0].self_attn if name == "attn_q" else ref.model.layers[0].mlp,
                    "q_proj" if name == "attn_q" else "down_proj").weight.data
        w = w[rows[name]] if name in rows else w
        x = inputs[name]
        g_vals = torch.from_numpy(gptq[f"blk.0.{name}.weight"][1])
        r_vals = torch.from_numpy(rtn[f"blk.0.{name}.weight"][1])
        assert _err(w, g_vals, x) < _err(w, r_vals, x)
    assert np.array_equal(gptq["token_embd.weight"][1], rtn["token_embd.weight"][1])  # not a block matrix: RTN


def test_awq_export_folds_scales_keeps_the_function_and_rounds_on_the_grid(tmp_path):
    ids = _calib()
    ref, tok = tiny_llama(hidden=256, ff=256, init=0.08)
    model, _ = tiny_llama(hidden=256, ff=256, init=0.08)
    with torch.no_grad():
        before = model(input_ids=ids[:2]).logits
    report = export_(model, tok, ExportConfig(format="gguf", type="q4_k_m", method="awq"), tmp_path / "a.gguf", ids)
    assert report["awq_scaled_groups"] == 6 and report["gptq_matrices"] == 0
    with torch.no_grad():  # the folded (still float) model computes the same function
        assert torch.allclose(model(input_ids=ids[:2]).logits, before, atol=1e-4, rtol=1e-4)
    norms = [l.input_layernorm.weight for l in model.model.layers]
    assert any(not torch.equal(n, r.input_layernorm.weight) for n, r in zip(norms, ref.model.layers))
    vals = _file_values(tmp_path / "a.gguf")
    assert np.array_equal(vals["blk.0.attn_norm.weight"][1], norms[0].detach().numpy())
    down = model.model.layers[1].mlp.down_proj.weight.data  # RTN of the scaled weights on the file's type
    grid = type_grid(down, vals["blk.1.ffn_down.weight"][0])
    assert np.array_equal(vals["blk.1.ffn_down.weight"][1], grid.values(grid.codes).numpy())


def test_calibrated_methods_refuse_what_cannot_work(tmp_path):
    with pytest.raises(UserError, match="quantized type"):
        ExportConfig(format="gguf", type="f16", method="gptq")
    with pytest.raises(UserError, match="GGUF block types"):
        ExportConfig(format="onnx", type="int4", method="awq")
    model, tok = tiny_llama(hidden=40, ff=128)  # rows of 40: no 32-blocks
    with pytest.raises(UserError, match="rows of 40"):
        export_(model, tok, ExportConfig(format="gguf", type="q4_k_m", method="awq"), tmp_path / "x.gguf", _calib(2))
    assert not list(tmp_path.iterdir())


def test_cli_awq_gptq_on_a_k_quant_mix_and_bad_input(tmp_path):
    from lmslim.cli.main import main

    model, tok = tiny_llama(hidden=256, ff=256, init=0.08)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    data = tmp_path / "calib.txt"
    data.write_text("Some calibration text about llamas and files. " * 200)
    common = ["--calib", str(data), "--calib-samples", "2", "--seq-len", "32"]
    assert main(["export", str(src), "--type", "q4_k_m", "--method", "awq_gptq", *common,
                 "--out", str(tmp_path / "g.gguf")]) == 0
    _, tensors = read(tmp_path / "g.gguf")
    assert [tensors[f"blk.{i}.ffn_down.weight"].tensor_type.name for i in (0, 1)] == ["Q4_K", "Q6_K"]
    assert main(["export", str(src), "--type", "f16", "--method", "awq", *common, "--out", str(tmp_path / "b.gguf")]) == 2
    assert main(["export", str(src), "--type", "q4_k_m", "--method", "magic", "--out", str(tmp_path / "c.gguf")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "g.gguf", "src"]
