"""SmolLM2-135M exported to GGUF and run in the real llama.cpp (small slices, to stay within CI's time)."""

from __future__ import annotations

import os

import pytest

try:
    import llama_cpp  # noqa: F401
except ImportError:
    if os.environ.get("LMSLIM_REQUIRE_ENGINES"):
        raise
    pytest.skip("llama-cpp-python is not installed (pip install 'lmslim[engines]')", allow_module_level=True)

from lmslim.data.spec import load_data
from lmslim.measure.engines.llama_cpp import LlamaCppLM, perplexity_gguf
from lmslim.measure.eval import perplexity
from lmslim.modelio import load_model
from lmslim.modelio.export import export_model
from lmslim.modelio.export.gguf import GGUFExportConfig

pytestmark = pytest.mark.integration


def test_smollm2_f32_export_scores_as_pytorch_in_llama_cpp(tmp_path):
    docs = load_data("builtin:wiki:test").documents
    lm = load_model("builtin:smollm2-135m")
    ref = perplexity(lm.model, lm.tokenizer, docs, max_tokens=1024)
    path = tmp_path / "smollm2-f32.gguf"
    export_model(lm.model, lm.tokenizer, "gguf", path, GGUFExportConfig(type="f32"))
    got = perplexity_gguf(path, docs, max_tokens=1024, threads=2)
    assert got["tokens_scored"] == ref["tokens_scored"]
    assert abs(got["perplexity"] / ref["perplexity"] - 1) < 0.005
    # the file's own tokenizer (llama.cpp's BPE) splits real text exactly as lmslim's does
    engine = LlamaCppLM(path, 64, threads=2)
    try:
        text = docs[0][:2000]
        assert engine.llm.tokenize(text.encode(), add_bos=False, special=False) == \
            lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        engine.close()
