"""ONNX export: logits in the real ONNX Runtime against PyTorch (prefill and KV-cache decode), lmslim's
codes in MatMulNBits, per-layer shapes, refusals.

Skipped only when onnxruntime is not installed and LMSLIM_REQUIRE_ENGINES is unset (CI sets it, so a
missing engine fails there instead of skipping). Perplexity and bench: tests/measure/test_engine_onnxruntime.py.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.engines import require_engines  # noqa: E402

require_engines("onnx", "onnxruntime")

import onnx  # noqa: E402

from lmslim.core.errors import UserError
from lmslim.measure.engines.onnxruntime import empty_cache, export_meta, session
from lmslim.modelio.export import export_model
from lmslim.modelio.export.onnx import ONNXExportConfig
from tests.modelio.test_export_gguf import _tree_hash, tiny_llama

IDS = [[5, 17, 33, 99, 120, 7, 8, 200, 44, 61, 250, 3, 90, 91, 92, 13]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(init=0.25, seed=1)  # wide weights: a wrong rotary or head layout shows in the logits


def _export(model, path, **kw):
    export_model(model[0], model[1], "onnx", path, ONNXExportConfig(**kw))
    return path


def _prefill(path, ids):
    ids = np.asarray(ids, np.int64)
    return session(path, 1).run(["logits"], {"input_ids": ids, **empty_cache(export_meta(path), ids.shape[0])})[0]


def _decode(path, ids, first: int):
    """Logits of a prefill of ``first`` tokens, then one token at a time through the KV cache."""
    ids = np.asarray(ids, np.int64)
    sess = session(path, 1)
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": ids[:, :first], **empty_cache(export_meta(path), ids.shape[0])}
    logits = []
    for j in range(first, ids.shape[1] + 1):
        out = sess.run(names, feeds)
        logits.append(out[0])
        feeds = {"input_ids": ids[:, j:j + 1], **{n.replace("present.", "past_key_values."): v
                                                   for n, v in zip(names[1:], out[1:])}}
    return np.concatenate(logits, axis=1)


def _torch(m, ids):
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids)).logits.numpy()


def test_f32_prefill_and_cached_decode_match_pytorch(model, tmp_path):
    m, _ = model
    path = _export(model, tmp_path / "f32", type="f32")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.onnx", "model.onnx.data",
                                                      "tokenizer.json", "tokenizer_config.json"]
    onnx.checker.check_model(str(path / "model.onnx"))
    batch = IDS + [list(reversed(IDS[0]))]  # dynamic batch axis: two different sequences at once
    ref = _torch(m, batch)
    scale = np.abs(ref).max()
    assert np.abs(_prefill(path, batch) - ref).max() < 1e-5 * scale
    assert np.abs(_decode(path, batch, 5) - ref).max() < 1e-5 * scale
    # a prefill split anywhere gives the same logits: positions come from the cache's length
    assert np.abs(_decode(path, IDS, 1) - ref[:1]).max() < 1e-5 * scale


def test_padded_batch_with_attention_mask_matches_each_sequence_alone(model, tmp_path):
    m, _ = model
    path = _export(model, tmp_path / "f32", type="f32")
    sess = session(path, 1)
    names = [o.name for o in sess.get_outputs()]
    short, long = IDS[0][:9], IDS[0]
    alone = [_torch(m, [short])[0], _torch(m, [long])[0]]  # (T, V) each, no padding
    scale = max(np.abs(a).max() for a in alone)
    pad = len(long) - len(short)
    for left in (True, False):  # generation pads on the left; right padding must work too
        ids = np.array([[0] * pad + short if left else short + [0] * pad, long], np.int64)
        mask = np.array([[0] * pad + [1] * len(short) if left else [1] * len(short) + [0] * pad, [1] * len(long)])
        out = sess.run(names, {"input_ids": ids, "attention_mask": mask, **empty_cache(export_meta(path), 2)})
        real = slice(pad, None) if left else slice(0, len(short))
        assert np.abs(out[0][0, real] - alone[0]).max() < 1e-5 * scale
        assert np.abs(out[0][1] - alone[1]).max() < 1e-5 * scale
        # one decode step through the cache, the mask grown by the new token: still each sequence alone
        nxt = np.array([[7], [8]], np.int64)
        feeds = {"input_ids": nxt, "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                 **{n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}}
        step = sess.run(["logits"], feeds)[0][:, 0]  # (2, V)
        assert np.abs(step[0] - _torch(m, [short + [7]])[0, -1]).max() < 1e-5 * scale
        assert np.abs(step[1] - _torch(m, [long + [8]])[0, -1]).max() < 1e-5 * scale
    # without the mask the padding is read as tokens: the short sequence's logits are not its own
    ids = np.array([[0] * pad + short, long], np.int64)
    unmasked = sess.run(["logits"], {"input_ids": ids, **empty_cache(export_meta(path), 2)})[0]
    assert np.abs(unmasked[0, pad:] - alone[0]).max() > 1e-2 * scale


def _quantized(bits, group_size=32, symmetric=False):
    from lmslim.compress.quantize import RTNConfig, quantize_

    m, tok = tiny_llama(init=0.25, seed=1)
    # the dequant kernel: lmslim's weight-only math (its int8 kernels also round the activations)
    quantize_(m, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric, kernel="dequant"))
    return m, tok


def _initializer(path, prefix):
    proto = onnx.load(str(path / "model.onnx"))
    (t,) = [t for t in proto.graph.initializer if t.name.startswith(prefix + "_")]
    return onnx.numpy_helper.to_array(t, base_dir=str(path))


@pytest.mark.parametrize("bits,kind,symmetric,group_size", [
    (4, "int4", False, 32), (4, "int4", True, 32), (8, "int8", False, 32),
    (8, "int8", True, None), (8, "int8", False, None)], ids=["int4", "int4-sym", "int8", "int8-sym-per-channel",
                                                             "int8-per-channel"])
def test_quantized_model_keeps_its_codes_and_logits(tmp_path, bits, kind, symmetric, group_size):
    qm = _quantized(bits, group_size=group_size, symmetric=symmetric)
    ref = _torch(qm[0], IDS)
    scale = np.abs(ref).max()
    exact = _export(qm, tmp_path / "exact", type=kind, int8_compute=False)
    codes = qm[0].model.layers[1].self_attn.v_proj.codes().numpy()  # (32, 64)
    packed = _initializer(exact, "l1.v.qweight")  # (N, blocks, bytes)
    got = packed.reshape(32, -1) if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(32, -1)
    np.testing.assert_array_equal(got, codes)
    # 4-bit: float32 zero points, lmslim's weights to float32 rounding. 8-bit MatMulNBits takes integer
    # zero points only: lmslim's fp16 offset differs from -z·scale by up to 2^-12 relative (measured 2.5e-3 here)
    tol = (1e-3 if bits == 4 or symmetric else 5e-3) * scale
    assert np.abs(_prefill(exact, IDS) - ref).max() < tol
    assert np.abs(_decode(exact, IDS, 4) - ref).max() < tol
    fast = _export(qm, tmp_path / "fast", type=kind)  # ORT's int8 compute: activations rounded per block
    rel = np.linalg.norm(_prefill(fast, IDS) - ref) / np.linalg.norm(ref)
    assert rel < 0.06  # measured 2.9-3.1%: this wide-initialised model amplifies rounding (SmolLM2: see docs)


def test_quantized_embedding_and_head_export(tmp_path):
    from lmslim.compress.quantize import RTNConfig, quantize_

    m, tok = tiny_llama(init=0.25, seed=1)
    quantize_(m, RTNConfig(bits=4, group_size=32, kernel="dequant", include_lm_head=True, include_embeddings=True))
    ref = _torch(m, IDS)
    path = _export((m, tok), tmp_path / "q", type="int4", int8_compute=False)
    assert np.abs(_prefill(path, IDS) - ref).max() < 1e-3 * np.abs(ref).max()
    assert export_meta(path)["cost"]["params"] == 260 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) \
        + 64 * 5  # the table (looked up, dequantized) and the 4-bit head are both in the file


def test_float_model_to_int4_is_lmslims_rtn_with_partial_groups(tmp_path):
    from lmslim.assets.tiny import build_tiny
    from lmslim.compress.quantize import RTNConfig, quantize_

    m, tok = build_tiny("tiny-llama")  # FFN width 176 = 5·32 + 16: the last group of down_proj is partial
    path = _export((m, tok), tmp_path / "i4", type="int4", group_size=32, int8_compute=False)
    quantize_(m, RTNConfig(bits=4, group_size=32, kernel="dequant"))
    ref = _torch(m, IDS)
    assert np.abs(_prefill(path, IDS) - ref).max() < 1e-3 * np.abs(ref).max()


def test_per_layer_shapes_export_and_match(tmp_path):
    from lmslim.compress.prune import PRUNERS, prune_
    from lmslim.nn.blocks import new_linear_like

    m, tok = tiny_llama(init=0.25, seed=2)
    prune_(m, PRUNERS.config_class("heads")(drop_heads=2), torch.randint(10, 250, (2, 32)))
    mlp = m.model.layers[1].mlp  # layer 1 keeps 96 of 128 FFN channels
    mlp.gate_proj = new_linear_like(mlp.gate_proj, 96, 64, False)
    mlp.up_proj = new_linear_like(mlp.up_proj, 96, 64, False)
    mlp.down_proj = new_linear_like(mlp.down_proj, 64, 96, False)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        torch.nn.init.normal_(lin.weight, std=0.25)  # new_linear_like leaves the weights unset
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach() * 0.5)  # an untied head: its own MatMul
    path = _export((m, tok), tmp_path / "p", type="f32")
    layers = export_meta(path)["layers"]
    assert [x["ffn"] for x in layers] == [128, 96] and sum(x["heads"] for x in layers) < 8
    ref = _torch(m, IDS)
    assert np.abs(_decode(path, IDS, 6) - ref).max() < 1e-5 * np.abs(ref).max()


def test_refusals_leave_nothing(tmp_path, model):
    from lmslim.assets.tiny import build_tiny

    gpt2, tok2 = build_tiny("tiny-gpt2")
    with pytest.raises(UserError, match="Llama-architecture"):
        export_model(gpt2, tok2, "onnx", tmp_path / "a", ONNXExportConfig())
    with pytest.raises(UserError, match="unknown ONNX type"):
        ONNXExportConfig(type="q4_0")
    with pytest.raises(UserError, match="power of two"):
        ONNXExportConfig(type="int4", group_size=48)
    q4 = _quantized(4)
    with pytest.raises(UserError, match="already quantized to 4 bits"):
        export_model(*q4, "onnx", tmp_path / "b", ONNXExportConfig(type="int8"))
    odd = _quantized(4, group_size=24)
    with pytest.raises(UserError, match="group size 24"):
        export_model(*odd, "onnx", tmp_path / "d", ONNXExportConfig(type="int4"))
    assert list(tmp_path.iterdir()) == []
    _export(model, tmp_path / "e", type="f32")
    with pytest.raises(UserError, match="already exists"):
        _export(model, tmp_path / "e", type="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_cli_export_guards_output_and_input(tmp_path):
    from lmslim.cli.main import main

    m, tok = tiny_llama()
    src = tmp_path / "src"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    before = _tree_hash(src)
    assert main(["export", str(src), "--format", "onnx", "--type", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "o")]) == 0
    first = _tree_hash(tmp_path / "o")
    assert main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2  # exists
    assert main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "o"), "--overwrite"]) == 2
    assert _tree_hash(tmp_path / "o") == first
    assert main(["export", str(src), "--format", "onnx", "--out", str(src / "x")]) == 2  # inside the input
    assert main(["export", str(src), "--format", "onnx", "--type", "q4_0", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(src), "--format", "onnx", "--type", "int4", "--group-size", "48",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["export", "builtin:tiny-gpt2", "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert _tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["o", "src"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
