"""ONNX exports measured in the real ONNX Runtime: perplexity on the torch path's windows, bench fields, CLI.

Skipped only when onnxruntime is not installed and LMSLIM_REQUIRE_ENGINES is unset (CI sets it, so a
missing engine fails there instead of skipping).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.engines import TEXT, engine_model, require_engines  # noqa: E402

require_engines("onnx", "onnxruntime")

import onnxruntime  # noqa: E402

from lmslim.measure.engines.onnxruntime import bench_onnx, perplexity_onnx
from lmslim.measure.eval import perplexity
from lmslim.modelio.export import export_model
from lmslim.modelio.export.onnx import ONNXExportConfig


@pytest.fixture(scope="module")
def model():
    return engine_model()


def _export(model, path, **kw):
    export_model(model[0], model[1], "onnx", path, ONNXExportConfig(**kw))
    return path


def test_perplexity_in_onnxruntime_matches_pytorch_on_the_same_windows(model, tmp_path):
    m, tok = model
    ref = perplexity(m, tok, TEXT, window=64, stride=32)
    f32 = perplexity_onnx(_export(model, tmp_path / "f32", type="f32"), TEXT, window=64, stride=32, threads=1)
    assert f32["tokens_scored"] == ref["tokens_scored"] and f32["windows"] == ref["windows"]
    assert abs(f32["perplexity"] / ref["perplexity"] - 1) < 1e-4  # float32 on both sides
    i8 = perplexity_onnx(_export(model, tmp_path / "i8", type="int8", group_size=32), TEXT, window=64, stride=32,
                         threads=1)
    i4 = perplexity_onnx(_export(model, tmp_path / "i4", type="int4", group_size=32), TEXT, window=64, stride=32,
                         threads=1)
    assert abs(i8["perplexity"] / ref["perplexity"] - 1) < 0.03
    assert abs(i4["perplexity"] / ref["perplexity"] - 1) > abs(i8["perplexity"] / ref["perplexity"] - 1)


def test_bench_reports_the_torch_bench_fields(model, tmp_path):
    from lmslim.measure.bench import BenchConfig, peak_rss_mb

    path = _export(model, tmp_path / "b", type="int4", group_size=32)
    r = bench_onnx(path, BenchConfig(batch=2, prompt_len=8, gen_len=4, repeats=2, warmup=1), threads=1)
    for key in ("prefill_ms_p50", "prefill_ms_p95", "decode_tokens_per_s", "decode_ms_per_token_p50", "peak_rss_mb",
                "size_mb", "params", "bytes_read_per_token", "decode_bound_tokens_per_s", "fraction_of_bound"):
        assert r[key] > 0, key
    assert r["size_mb"] == sum((path / n).stat().st_size for n in ("model.onnx", "model.onnx.data")) / 1e6
    assert r["params"] == sum(p.numel() for p in model[0].parameters())  # tied embedding counted once
    assert r["prefill_ms_p95"] >= r["prefill_ms_p50"]
    assert r["peak_rss_mb"] < peak_rss_mb()  # the worker's own peak, not this torch-laden process's
    f32 = bench_onnx(_export(model, tmp_path / "f", type="f32"), BenchConfig(prompt_len=8, gen_len=2, repeats=1,
                                                                           warmup=0), threads=1)
    assert f32["bytes_read_per_token"] > r["bytes_read_per_token"]  # 4-bit blocks read fewer bytes


def test_cli_eval_and_bench_in_onnxruntime(model, tmp_path):
    from lmslim.cli.main import main

    path = _export(model, tmp_path / "c", type="int8", group_size=32)
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(TEXT))
    out = tmp_path / "e.json"
    assert main(["eval", str(path), "--data", str(data), "--engine", "onnxruntime", "--window", "64", "--stride",
                 "32", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["engine"]["name"] == "onnxruntime" and r["engine"]["version"] == onnxruntime.__version__
    assert np.isfinite(r["perplexity"]) and r["model"]["source"] == "onnx"
    b = tmp_path / "b.json"
    assert main(["bench", str(path), "--engine", "onnxruntime", "--prompt-len", "8", "--gen-len", "4", "--repeats",
                 "1", "--warmup", "0", "--threads", "1", "--json", str(b)]) == 0
    assert json.loads(b.read_text())["engine"]["name"] == "onnxruntime"
    # a Hugging Face folder is not an ONNX export; classification is not measured there: one-line errors
    folder = tmp_path / "src"
    model[0].save_pretrained(folder)
    model[1].save_pretrained(folder)
    assert main(["eval", str(folder), "--data", str(data), "--engine", "onnxruntime", "--json",
                 str(tmp_path / "x.json")]) == 2
    assert main(["eval", str(path), "--data", str(data), "--engine", "onnxruntime", "--task", "seq-cls"]) == 2
    assert main(["bench", str(path), "--engine", "onnxruntime", "--task", "embed"]) == 2
    assert not (tmp_path / "x.json").exists()


@pytest.mark.integration
def test_smollm2_f32_export_perplexity_matches_pytorch(tmp_path):
    from lmslim.data.spec import load_data
    from lmslim.modelio import load_model

    torch.set_num_threads(2)
    lm = load_model("builtin:smollm2-135m")
    docs = load_data("builtin:wiki:test", task="clm").documents
    path = tmp_path / "smol"
    export_model(lm.model, lm.tokenizer, "onnx", path, ONNXExportConfig(type="f32"))
    ref = perplexity(lm.model, lm.tokenizer, docs, window=256, stride=128, max_tokens=512)
    got = perplexity_onnx(path, docs, window=256, stride=128, max_tokens=512, threads=2)  # the folder's tokenizer
    assert got["tokens_scored"] == ref["tokens_scored"] and got["windows"] == ref["windows"]
    assert abs(got["perplexity"] / ref["perplexity"] - 1) < 0.005
