"""Q3_K, Q2_K, Q5_K and Q5_1 blocks: bytes read back by gguf-py's own dequantizer, error vs plain rounding,
the q3_k_m / q2_k presets' per-tensor types. Against llama.cpp itself: test_export_gguf_llama_cpp.py."""

from __future__ import annotations

import numpy as np
import pytest

from lmslim.core.errors import UserError
from lmslim.modelio.export import export_model
from lmslim.modelio.export.gguf import GGUFExportConfig
from lmslim.modelio.export.gguf_blocks import mix_type
from lmslim.modelio.export.gguf_kquants import quantize_kquant
from lmslim.modelio.export.gguf_kquants_low import quantize_q5_1
from tests.modelio.test_export_gguf import read, tiny_llama


def _weights(rows=8, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[1, 3], w[2, 300] = 0.4, -0.3  # outliers
    w[5, :256] = np.abs(w[5, :256])  # an all-positive super-block
    w[6, 256:] = 0  # an all-zero one
    return w, rng.uniform(0.1, 4, cols).astype(np.float32)


def _quantize(w, kind, imp=None):
    return quantize_q5_1(w, imp) if kind == "q5_1" else quantize_kquant(w, kind, imp)


@pytest.mark.parametrize("kind,block_bytes", [("q3_k", 110), ("q2_k", 84), ("q5_k", 176), ("q5_1", 24 * 8)])
def test_blocks_round_trip_through_gguf_py_bit_exactly(kind, block_bytes):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    w, importance = _weights()
    for imp in (None, importance):
        raw, deq = _quantize(w, kind, imp)
        assert raw.shape == (8, 2 * block_bytes) and raw.dtype == np.uint8
        # gguf-py's independent decoder reads exactly the values lmslim rounded to
        np.testing.assert_array_equal(gguf_dequantize(raw, GGMLQuantizationType[kind.upper()]), deq)
        assert (deq[6, 256:] == 0).all()
    err = float(((deq - w) ** 2).mean() / (w ** 2).mean())
    assert 0 < err < {"q3_k": 0.04, "q2_k": 0.1, "q5_k": 0.002, "q5_1": 0.002}[kind]


def _plain_q3k(w):
    """Plain RTN on Q3_K's grid: each 16-block's signed extreme on code −4, sub-scales on 6 bits, nearest codes."""
    xs = w.reshape(-1, 16, 16)  # (S, sub-block, 16)
    peak = np.take_along_axis(xs, np.abs(xs).argmax(2)[..., None], 2)[..., 0]
    s = peak / -4
    ext = np.take_along_axis(s, np.abs(s).argmax(1)[:, None], 1)
    d = (ext / -32).astype(np.float16).astype(np.float32)
    step = d * np.clip(np.rint(s / np.where(d != 0, d, 1)), -32, 31)  # (S, 16)
    q = np.clip(np.rint(xs / np.where(step != 0, step, 1)[..., None]), -4, 3)
    return (step[..., None] * q).reshape(w.shape)


def _plain_q2k(w):
    """Plain RTN on Q2_K's grid: each 16-block's [min(0, lo), hi] in 3 steps, scales/mins on 4 bits, nearest codes."""
    xs = w.reshape(-1, 16, 16)
    lo, hi = np.minimum(xs.min(2), 0), xs.max(2)
    s, mn = (hi - lo) / 3, -lo
    d = (s.max(1, keepdims=True) / 15).astype(np.float16).astype(np.float32)
    dm = (mn.max(1, keepdims=True) / 15).astype(np.float16).astype(np.float32)
    step = d * np.clip(np.rint(s / np.where(d > 0, d, 1)), 0, 15)
    off = dm * np.clip(np.rint(mn / np.where(dm > 0, dm, 1)), 0, 15)
    q = np.clip(np.rint((xs + off[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, 3)
    return (step[..., None] * q - off[..., None]).reshape(w.shape)


@pytest.mark.parametrize("kind", ["q3_k", "q2_k"])
def test_search_beats_plain_rounding_on_the_same_grid_with_and_without_importance(kind):
    w = (np.random.default_rng(3).standard_normal((32, 1024)) * 0.02).astype(np.float32)
    plain = (_plain_q3k if kind == "q3_k" else _plain_q2k)(w)
    imp = np.random.default_rng(4).gamma(0.5, 2, 1024).astype(np.float32)  # a few columns matter most
    for weights in (None, imp):
        wt = 1 if weights is None else weights

        def err(deq):
            return float((((deq - w) ** 2) * wt).sum())

        mine = err(quantize_kquant(w, kind, weights)[1])
        assert mine < 0.95 * err(plain)
    # the importance search trades unweighted error for weighted error, as it should
    with_imp, without = quantize_kquant(w, kind, imp)[1], quantize_kquant(w, kind)[1]
    assert float((((with_imp - w) ** 2) * imp).sum()) < float((((without - w) ** 2) * imp).sum())


def test_bad_shapes_and_importance_are_refused():
    w = np.zeros((2, 320), np.float32)
    with pytest.raises(UserError, match="super-blocks of 256"):
        quantize_kquant(w, "q3_k")
    with pytest.raises(UserError, match="importance"):
        quantize_kquant(np.zeros((2, 256), np.float32), "q2_k", np.full(256, np.nan, np.float32))
    with pytest.raises(UserError, match="blocks of 32"):
        quantize_q5_1(np.zeros((2, 40), np.float32))


def test_mix_rules_follow_llama_cpp_per_role_layer_and_gqa():
    assert [mix_type("q3_k_m", f"blk.{i}.attn_v.weight", 32) for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert [mix_type("q3_k_m", f"blk.{i}.ffn_down.weight", 32) for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert mix_type("q3_k_m", "blk.0.ffn_down.weight", 8) == "q4_k"  # 8 // 16 = 0 layers get q5_k
    assert mix_type("q3_k_m", "blk.3.attn_output.weight", 8) == "q4_k"
    assert mix_type("q3_k_m", "blk.3.ffn_up.weight", 8) == "q3_k"
    assert mix_type("q2_k", "blk.0.attn_v.weight", 8, gqa=3) == "q3_k"
    assert mix_type("q2_k", "blk.0.attn_v.weight", 8, gqa=4) == "q4_k"
    assert mix_type("q2_k", "blk.0.ffn_down.weight", 8) == mix_type("q2_k", "blk.0.attn_output.weight", 8) == "q3_k"
    assert mix_type("q2_k", "blk.0.attn_q.weight", 8) == "q2_k"
    assert mix_type("q2_k", "token_embd.weight", 8) == "q6_k"  # tied: it is the LM head
    assert mix_type("q2_k", "token_embd.weight", 8, tied=False) == "q2_k"


def test_q3_k_m_and_q2_k_exports_hold_their_types_and_fall_back_on_narrow_rows(tmp_path):
    from gguf import GGMLQuantizationType as T

    model, tok = tiny_llama(hidden=256, ff=512)
    report = export_model(model, tok, "gguf", tmp_path / "m.gguf", GGUFExportConfig(type="q2_k"))
    _, t = read(tmp_path / "m.gguf")
    assert t["blk.0.attn_q.weight"].tensor_type == T.Q2_K and t["blk.1.ffn_down.weight"].tensor_type == T.Q3_K
    assert t["token_embd.weight"].tensor_type == T.Q6_K and report["fallbacks"] == {}
    narrow, tok = tiny_llama(hidden=96, ff=512)  # rows of 96: llama.cpp's fallbacks q4_0 / q5_1 / q5_0 / q8_0
    report = export_model(narrow, tok, "gguf", tmp_path / "n.gguf", GGUFExportConfig(type="q3_k_m"))
    _, t = read(tmp_path / "n.gguf")
    assert t["blk.0.attn_q.weight"].tensor_type == T.Q4_0 and t["blk.1.attn_v.weight"].tensor_type == T.Q5_1
    assert t["blk.0.attn_output.weight"].tensor_type == T.Q5_0 and t["blk.0.ffn_down.weight"].tensor_type == T.Q4_K
    assert t["token_embd.weight"].tensor_type == T.Q8_0
    assert report["fallbacks"]["q3_k->q4_0"] == 8 and report["fallbacks"]["q5_k->q5_1"] == 2
    pure = export_model(model, tok, "gguf", tmp_path / "p.gguf",
                        GGUFExportConfig(type="q2_k", tensor_types=(("blk.*", "q2_k"),)))
    assert pure["types"] == {"q2_k": 14, "q6_k": 1, "f32": 5}
