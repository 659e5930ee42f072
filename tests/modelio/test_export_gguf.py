"""GGUF export: tensors, block bytes and refusals, checked with gguf-py's own reader and dequantizer.

Running the files in llama.cpp is tests/measure/test_engine_llama_cpp.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lmslim.core.errors import UserError
from lmslim.modelio.export import export_model
from lmslim.modelio.export.gguf import GGUFExportConfig, _rope_rows
from lmslim.modelio.export.gguf_blocks import decode_codes, grid_of, round_on
from lmslim.nn.scheme import dequantize, quantize_weight


def tiny_llama(hidden=64, ff=128, vocab=None, init=0.02, seed=0):
    """A 2-layer Llama with the byte tokenizer and block-divisible widths (64, 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmslim.assets.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=ff, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=init, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def read(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    return r.fields[key].contents()


def test_f32_export_holds_the_weights_metadata_and_tokenizer(tmp_path):
    model, tok = tiny_llama()
    out = tmp_path / "m.gguf"
    report = export_model(model, tok, "gguf", out, GGUFExportConfig(type="f32"))
    r, t = read(out)
    assert report["types"] == {"f32": 20} and len(t) == 20  # tied head: no output.weight
    assert field(r, "general.architecture") == "llama"
    assert (field(r, "llama.attention.head_count"), field(r, "llama.attention.head_count_kv")) == (4, 2)
    assert field(r, "llama.attention.key_length") == 16 and field(r, "llama.feed_forward_length") == 128
    assert field(r, "tokenizer.ggml.pre") == "gpt-2" and len(r.fields["tokenizer.ggml.tokens"].data) == len(tok)
    assert field(r, "tokenizer.ggml.bos_token_id") == 1 and field(r, "tokenizer.ggml.add_bos_token") is False
    layer = model.model.layers[1]
    np.testing.assert_array_equal(t["blk.1.attn_v.weight"].data, layer.self_attn.v_proj.weight.detach().numpy())
    np.testing.assert_array_equal(t["token_embd.weight"].data, model.model.embed_tokens.weight.detach().numpy())
    # q rows are reordered per head into llama.cpp's interleaved rotary pairs, nothing else changes
    q = layer.self_attn.q_proj.weight.detach()
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"].data, q[_rope_rows(64, 4)].numpy())
    assert not np.array_equal(t["blk.1.attn_q.weight"].data, q.numpy())


def test_rope_rows_interleave_the_two_halves_of_each_head():
    # head of 4 dims: HF order (x0, x1 | y0, y1) pairs (x_i, y_i); llama.cpp wants x0, y0, x1, y1
    assert _rope_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_block_bytes_are_lmslims_rtn_codes(tmp_path, kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    model, tok = tiny_llama()
    out = tmp_path / f"m-{kind}.gguf"
    report = export_model(model, tok, "gguf", out, GGUFExportConfig(type=kind, embed_type="f32"))
    assert report["types"][kind] == 14
    _, t = read(out)
    for name, w, rows in (("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight, None),
                          ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight, _rope_rows(32, 2))):
        w = w.detach() if rows is None else w.detach()[rows]
        codes, scale, offset = round_on(w, kind)
        raw = np.asarray(t[name].data)
        assert t[name].tensor_type == GGMLQuantizationType[kind.upper()]
        np.testing.assert_array_equal(decode_codes(raw, kind, tuple(w.shape)), codes.numpy())
        # gguf-py's independent decoder gives exactly lmslim's dequantized weights
        np.testing.assert_array_equal(gguf_dequantize(raw, GGMLQuantizationType[kind.upper()]),
                                      dequantize(codes, scale, offset, 32).numpy())


def test_codes_of_a_quantized_model_are_written_as_they_are_and_other_grids_refused(tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from lmslim.compress.quantize import RTNConfig, quantize_

    model, tok = tiny_llama()
    quantize_(model, RTNConfig(bits=4, group_size=32, symmetric=True, clip_search=True))
    qv = model.model.layers[0].self_attn.v_proj
    out = tmp_path / "q.gguf"
    export_model(model, tok, "gguf", out, GGUFExportConfig(type="q4_0"))
    _, t = read(out)
    raw = np.asarray(t["blk.0.attn_v.weight"].data)
    np.testing.assert_array_equal(decode_codes(raw, "q4_0", (32, 64)), qv.codes().numpy())
    np.testing.assert_array_equal(gguf_dequantize(raw, GGMLQuantizationType.Q4_0), qv.dequantized_weight().numpy())
    export_model(model, tok, "gguf", tmp_path / "q41.gguf", GGUFExportConfig(type="q4_1"))  # a symmetric grid fits q4_1
    for kind in ("q8_0", "f16"):
        with pytest.raises(UserError, match="already quantized"):
            export_model(model, tok, "gguf", tmp_path / f"bad-{kind}.gguf", GGUFExportConfig(type=kind))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "q41.gguf"]  # refusals leave nothing


def test_mismatched_group_size_is_refused_not_rerounded(tmp_path):
    from lmslim.compress.quantize import RTNConfig, quantize_

    model, tok = tiny_llama()
    quantize_(model, RTNConfig(bits=4, group_size=64, symmetric=True))
    with pytest.raises(UserError, match="not the q4_0 grid"):
        export_model(model, tok, "gguf", tmp_path / "x.gguf", GGUFExportConfig(type="q4_0"))
    assert list(tmp_path.iterdir()) == []


def test_per_layer_shapes_rows_and_architectures_are_refused(tmp_path):
    from lmslim.assets.tiny import build_tiny
    from lmslim.nn.blocks import new_linear_like

    model, tok = tiny_llama()
    mlp = model.model.layers[1].mlp  # layer 1 keeps 96 of 128 FFN channels: per-layer widths
    mlp.gate_proj, mlp.up_proj = new_linear_like(mlp.gate_proj, 96, 64, False), new_linear_like(mlp.up_proj, 96, 64, False)
    mlp.down_proj = new_linear_like(mlp.down_proj, 64, 96, False)
    with pytest.raises(UserError, match="different shapes"):
        export_model(model, tok, "gguf", tmp_path / "a.gguf", GGUFExportConfig(type="f16"))
    odd, tok = build_tiny("tiny-llama")  # FFN width 176: not a multiple of 32
    with pytest.raises(UserError, match="176 weights"):
        export_model(odd, tok, "gguf", tmp_path / "b.gguf", GGUFExportConfig(type="q8_0"))
    gpt2, tok2 = build_tiny("tiny-gpt2")
    with pytest.raises(UserError, match="Llama-architecture"):
        export_model(gpt2, tok2, "gguf", tmp_path / "c.gguf", GGUFExportConfig())
    with pytest.raises(UserError, match="unknown GGUF type"):
        GGUFExportConfig(type="q1_k")
    assert list(tmp_path.iterdir()) == []


def test_uniformly_pruned_model_exports_its_own_head_count(tmp_path):
    from lmslim.compress.prune import PRUNERS, prune_

    model, tok = tiny_llama()
    prune_(model, PRUNERS.config_class("heads")(drop_heads=2), torch.randint(10, 250, (2, 32)))
    out = tmp_path / "p.gguf"
    report = export_model(model, tok, "gguf", out, GGUFExportConfig(type="f32"))
    r, t = read(out)
    heads = field(r, "llama.attention.head_count")
    assert heads == report["shape"]["heads"] < 4
    assert t["blk.0.attn_q.weight"].shape.tolist() == [64, heads * 16]


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_cli_export_guards_output_and_input(tmp_path):
    from lmslim.cli.main import main

    model, tok = tiny_llama()
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    before = _tree_hash(src)
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--type", "q4_0", "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["export", str(src), "--type", "f16", "--out", str(out)]) == 2  # exists: refused
    assert out.read_bytes() == first
    assert main(["export", str(src), "--type", "q4_0", "--out", str(tmp_path / "m.bin")]) == 2
    assert main(["export", str(src), "--type", "q4_0", "--out", str(src / "x.gguf")]) == 2  # inside the input
    assert main(["export", str(src), "--type", "q4_0", "--method", "gptq", "--calib-samples", "2", "--seq-len", "32",
                 "--calib", str(_text(tmp_path)), "--out", str(tmp_path / "g.gguf")]) == 0
    assert _tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gguf", "m.gguf", "src", "text.txt"]


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    return p


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q5_0"])
def test_kquant_blocks_round_trip_through_gguf_py_bit_exactly(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from lmslim.modelio.export.gguf_kquants import quantize_kquant, quantize_q5_0

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 512)) * 0.02).astype(np.float32)
    w[1, 3], w[2, 300], w[5, :256] = 0.4, -0.3, np.abs(w[5, :256])  # outliers and an all-positive super-block
    importance = rng.uniform(0.1, 4, 512).astype(np.float32)
    for imp in (None, importance):
        raw, deq = quantize_q5_0(w, imp) if kind == "q5_0" else quantize_kquant(w, kind, imp)
        # gguf-py's independent decoder reads exactly the values lmslim rounded to
        np.testing.assert_array_equal(gguf_dequantize(raw, GGMLQuantizationType[kind.upper()]), deq)
    err = float(((deq - w) ** 2).mean() / (w ** 2).mean())
    assert 0 < err < {"q4_k": 0.01, "q5_0": 0.003, "q6_k": 0.0006}[kind]


def test_q4_k_search_beats_ggml_reference_rounding_of_its_q5_0_fallback_and_q4_1():
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    from lmslim.modelio.export.gguf_kquants import quantize_kquant, quantize_q5_0

    w = (np.random.default_rng(1).standard_normal((16, 1024)) * 0.02).astype(np.float32)

    def err(deq):
        return float(((deq - w) ** 2).mean())

    ref = {k: err(gguf_dequantize(gguf_quantize(w, T[k]), T[k])) for k in ("Q5_0", "Q4_1")}
    assert err(quantize_q5_0(w)[1]) < ref["Q5_0"]  # the search starts at ggml's rule and keeps the better
    assert err(quantize_kquant(w, "q4_k")[1]) < ref["Q4_1"]  # 4.5 bits with 6-bit sub-scales vs 5 bits


def test_q4_0_rounds_on_all_16_codes_of_ggml_grid():
    w = torch.randn(64, 256)
    codes, scale, offset = round_on(w, "q4_0")
    assert set(codes.unique().tolist()) == set(range(16))  # 15 codes was the old max/7 grid
    assert torch.equal(offset, -8 * scale)
    # where ggml's signed rule is chosen, the block's largest-magnitude weight lands exactly on code 0
    blocks = w.reshape(64, 8, 32)
    peak = blocks.gather(2, blocks.abs().argmax(2, keepdim=True))[..., 0]
    signed = torch.isclose(scale, (peak / -8).half().float())
    assert signed.float().mean() > 0.5
    assert (codes.reshape(64, 8, 32).gather(2, blocks.abs().argmax(2, keepdim=True))[..., 0][signed] == 0).all()
    q_max7 = quantize_weight(w, grid_of("q4_0").__class__(4, 32, symmetric=True))[0]
    assert q_max7.max() < 15 or q_max7.min() > 0  # the plain symmetric rule never uses both ends


def test_q4_k_m_mix_follows_llama_cpp_types_and_falls_back_on_rows_of_576(tmp_path):
    from gguf import GGMLQuantizationType as T

    model, tok = tiny_llama(hidden=256, ff=512)
    report = export_model(model, tok, "gguf", tmp_path / "m.gguf", GGUFExportConfig(type="q4_k_m"))
    _, t = read(tmp_path / "m.gguf")
    # llama.cpp's use_more_bits with 2 layers: layer 1 (the last eighth) gets q6_k, layer 0 does not
    assert t["blk.1.ffn_down.weight"].tensor_type == T.Q6_K and t["blk.0.ffn_down.weight"].tensor_type == T.Q4_K
    assert t["blk.0.attn_q.weight"].tensor_type == T.Q4_K
    assert t["token_embd.weight"].tensor_type == T.Q6_K and report["fallbacks"] == {}
    narrow, tok = tiny_llama(hidden=96, ff=512)  # rows of 96 cannot hold 256-blocks: llama.cpp's fallbacks
    report = export_model(narrow, tok, "gguf", tmp_path / "n.gguf", GGUFExportConfig(type="q4_k_m"))
    _, t = read(tmp_path / "n.gguf")
    assert t["blk.0.attn_q.weight"].tensor_type == T.Q5_0 and t["blk.1.ffn_down.weight"].tensor_type == T.Q6_K
    assert t["blk.1.attn_v.weight"].tensor_type == T.Q8_0 and report["fallbacks"]["q4_k->q5_0"] > 0


def test_cli_refuses_a_type_the_shape_cannot_take_and_gptq_on_a_k_quant(tmp_path):
    from lmslim.cli.main import main

    model, tok = tiny_llama(hidden=40, ff=128)  # rows of 40: no 32-blocks at all
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    assert main(["export", str(src), "--type", "q4_k", "--out", str(tmp_path / "a.gguf")]) == 2
    assert main(["export", str(src), "--type", "q4_k", "--method", "gptq", "--out", str(tmp_path / "b.gguf")]) == 2
    assert main(["export", str(src), "--type", "q1_k", "--out", str(tmp_path / "c.gguf")]) == 2
    assert main(["export", str(src), "--type", "q2_k", "--out", str(tmp_path / "d.gguf")]) == 2  # rows of 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
