"""Exported GGUF files run in the real llama.cpp (llama-cpp-python): logits, perplexity, tokens, bench.

Skipped only when llama_cpp is not installed and LMSLIM_REQUIRE_ENGINES is unset (CI sets it, so a
missing engine fails there instead of skipping).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.engines import TEXT, engine_model, require_engines  # noqa: E402

require_engines("llama_cpp")

from lmslim.measure.engines.llama_cpp import LlamaCppLM, bench_gguf, gguf_tokenizer, perplexity_gguf
from lmslim.measure.eval import perplexity
from lmslim.modelio.export import export_model
from lmslim.modelio.export.gguf import GGUFExportConfig
from tests.modelio.test_export_gguf import tiny_llama


@pytest.fixture(scope="module")
def model():
    return engine_model()


def _export(model, path, **kw):
    m, tok = model
    export_model(m, tok, "gguf", path, GGUFExportConfig(**kw))
    return path


def _logits(path, ids):
    lm = LlamaCppLM(path, len(ids), threads=2)
    try:
        return lm(input_ids=torch.tensor([ids])).logits[0]
    finally:
        lm.close()


def test_f32_logits_match_pytorch_and_a_wrong_rope_layout_does_not(model, tmp_path, monkeypatch):
    m, tok = model
    ids = tok("\n\n".join(TEXT), add_special_tokens=False)["input_ids"][:96]
    with torch.no_grad():
        ref = m(input_ids=torch.tensor([ids])).logits[0]
    got = _logits(_export(model, tmp_path / "f32.gguf", type="f32"), ids)
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.02 * scale  # f16 KV cache: small, not zero
    import lmslim.modelio.export.gguf as g

    monkeypatch.setattr(g, "_rope_rows", lambda n, h: torch.arange(n))  # HF order written as is
    wrong = _logits(_export(model, tmp_path / "wrong.gguf", type="f32"), ids)
    assert (wrong - ref).abs().max() > 5 * (got - ref).abs().max()


def test_perplexity_in_llama_cpp_matches_pytorch_on_the_same_windows(model, tmp_path):
    m, tok = model
    ref = perplexity(m, tok, TEXT, window=64, stride=32)
    f32 = perplexity_gguf(_export(model, tmp_path / "f32.gguf", type="f32"), TEXT, window=64, stride=32, threads=2)
    assert f32["tokens_scored"] == ref["tokens_scored"] and f32["windows"] == ref["windows"]
    assert abs(f32["perplexity"] / ref["perplexity"] - 1) < 0.005
    q8 = perplexity_gguf(_export(model, tmp_path / "q8.gguf", type="q8_0"), TEXT, window=64, stride=32, threads=2)
    assert abs(q8["perplexity"] / ref["perplexity"] - 1) < 0.03
    q4 = perplexity_gguf(_export(model, tmp_path / "q4.gguf", type="q4_0", embed_type="q4_0"), TEXT, window=64,
                         stride=32, threads=2)
    assert abs(q4["perplexity"] / ref["perplexity"] - 1) > abs(q8["perplexity"] / ref["perplexity"] - 1)


def test_tokenizer_in_the_file_tokenizes_as_the_model_does(model, tmp_path):
    m, tok = model
    path = _export(model, tmp_path / "t.gguf", type="f16")
    lm = LlamaCppLM(path, 64, threads=1)
    try:
        for text in TEXT + ["ünïcödé — and\ttabs\n\nnew lines"]:
            expect = tok(text, add_special_tokens=False)["input_ids"]
            assert lm.llm.tokenize(text.encode(), add_bos=False, special=False) == expect
    finally:
        lm.close()
    assert gguf_tokenizer(path)(TEXT[1], add_special_tokens=False)["input_ids"] == \
        tok(TEXT[1], add_special_tokens=False)["input_ids"]


def test_bench_reports_the_torch_bench_fields(model, tmp_path):
    from lmslim.measure.bench import BenchConfig

    path = _export(model, tmp_path / "b.gguf", type="q8_0", embed_type="q8_0")
    r = bench_gguf(path, BenchConfig(prompt_len=8, gen_len=4, repeats=2, warmup=1), threads=1)
    for key in ("prefill_ms_p50", "prefill_ms_p95", "decode_tokens_per_s", "decode_ms_per_token_p50", "peak_rss_mb",
                "size_mb", "params", "bytes_read_per_token", "decode_bound_tokens_per_s", "fraction_of_bound"):
        assert r[key] > 0, key
    assert r["size_mb"] == path.stat().st_size / 1e6
    assert r["params"] == sum(p.numel() for p in model[0].parameters())  # tied embedding counted once
    assert r["prefill_ms_p95"] >= r["prefill_ms_p50"]
    from lmslim.measure.bench import peak_rss_mb

    # the engine's own process: a forked worker must not report this (torch-laden) process's peak
    assert r["peak_rss_mb"] < peak_rss_mb()


def test_cli_eval_and_bench_in_llama_cpp(model, tmp_path):
    from lmslim.cli.main import main

    path = _export(model, tmp_path / "c.gguf", type="f16")
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(TEXT))
    out = tmp_path / "e.json"
    assert main(["eval", str(path), "--data", str(data), "--engine", "llama.cpp", "--window", "64", "--stride", "32",
                 "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["engine"]["name"] == "llama.cpp" and r["engine"]["version"] and np.isfinite(r["perplexity"])
    b = tmp_path / "b.json"
    assert main(["bench", str(path), "--engine", "llama.cpp", "--prompt-len", "8", "--gen-len", "4", "--repeats",
                 "1", "--warmup", "0", "--threads", "1", "--json", str(b)]) == 0
    assert json.loads(b.read_text())["engine"]["name"] == "llama.cpp"
    # a folder is not a file llama.cpp runs; classification is not measured there: one-line errors
    folder = tmp_path / "src"
    model[0].save_pretrained(folder)
    model[1].save_pretrained(folder)
    assert main(["eval", str(folder), "--data", str(data), "--engine", "llama.cpp"]) == 2
    assert main(["eval", str(path), "--data", str(data), "--engine", "onnx"]) == 2
    assert main(["bench", str(path), "--engine", "llama.cpp", "--batch", "2"]) == 2
    assert not (tmp_path / "x.json").exists()


def _file_weights_model(model, path):
    """A copy of ``model`` holding exactly the weights ``path`` stores (gguf-py's dequantize, rope rows undone)."""
    import copy

    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lmslim.modelio.export.gguf import _rope_rows

    m = copy.deepcopy(model)
    t = {x.name: x for x in GGUFReader(path).tensors}

    def get(name, rows=None):
        x = t[name]
        w = torch.from_numpy(np.array(dequantize(x.data, x.tensor_type)).reshape(x.shape[::-1].tolist()).copy())
        return w.float() if rows is None else w.float()[torch.argsort(rows)]

    m.model.embed_tokens.weight.data = get("token_embd.weight")
    cfg = m.config
    for i, b in enumerate(m.model.layers):
        a, f = b.self_attn, b.mlp
        a.q_proj.weight.data = get(f"blk.{i}.attn_q.weight", _rope_rows(a.q_proj.out_features, cfg.num_attention_heads))
        a.k_proj.weight.data = get(f"blk.{i}.attn_k.weight", _rope_rows(a.k_proj.out_features, cfg.num_key_value_heads))
        for mod, n in ((a.v_proj, "attn_v"), (a.o_proj, "attn_output"), (f.gate_proj, "ffn_gate"),
                       (f.up_proj, "ffn_up"), (f.down_proj, "ffn_down")):
            mod.weight.data = get(f"blk.{i}.{n}.weight")
    return m


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q5_0", "q4_0", "q3_k", "q2_k", "q5_k", "q5_1"])
def test_kquant_export_runs_in_llama_cpp_on_exactly_lmslims_dequantized_weights(tmp_path, kind):
    m, tok = tiny_llama(hidden=256, ff=512, init=0.08, seed=1)  # rows of 256 and 512: whole super-blocks
    path = tmp_path / f"{kind}.gguf"
    export_model(m, tok, "gguf", path, GGUFExportConfig(type=kind, embed_type="f32",
                                                        tensor_types=(("blk.*", kind),)))
    ids = list(range(3, 99))
    with torch.no_grad():
        ref = m(input_ids=torch.tensor([ids])).logits[0]
        deq = _file_weights_model(m, path)(input_ids=torch.tensor([ids])).logits[0]
    got = _logits(path, ids)
    scale = ref.abs().max()
    # llama.cpp rounds the activations to 8 bits for these dot products (~3-5% of the logit range here);
    # a wrong block layout would put it as far from lmslim's weights as the rounding itself (10-50%).
    assert (got - deq).abs().max() / scale < 0.08
    assert (got - deq).abs().max() < 0.5 * (deq - ref).abs().max()


def test_llama_cpp_quantizer_with_importance_and_q4_k_m_types_match_lmslims_mix(tmp_path):
    from gguf import GGUFReader

    from lmslim.core.errors import UserError
    from lmslim.measure.engines.llama_cpp_quantize import llama_quantize
    from lmslim.modelio.export.gguf_imatrix import activation_importance

    m, tok = tiny_llama(hidden=256, ff=512, init=0.08, seed=1)
    f32 = _export((m, tok), tmp_path / "f32.gguf", type="f32")
    imp = activation_importance(m, torch.randint(3, 250, (2, 32)))
    report = llama_quantize(f32, tmp_path / "theirs.gguf", "Q4_K_M", imp)
    assert report["imatrix_tensors"] == 15  # 14 matrices + the tied embedding the head reads
    _export((m, tok), tmp_path / "mine.gguf", type="q4_k_m")
    theirs = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "theirs.gguf").tensors}
    mine = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "mine.gguf").tensors}
    assert mine == theirs  # lmslim's q4_k_m preset gives every tensor llama.cpp's Q4_K_M type
    with pytest.raises(UserError, match="already exists"):
        llama_quantize(f32, tmp_path / "theirs.gguf", "Q4_K_M")
    with pytest.raises(UserError, match="unknown llama.cpp type"):
        llama_quantize(f32, tmp_path / "x.gguf", "Q9_Z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.gguf", "mine.gguf", "theirs.gguf"]
