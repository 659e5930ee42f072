"""lmslim's Q3_K / Q2_K / Q5_K / Q5_1 files in the real llama.cpp, and against llama.cpp's own quantizer.

Skipped only when llama_cpp is not installed and LMSLIM_REQUIRE_ENGINES is unset (CI sets it).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engines import require_engines

require_engines("llama_cpp")

from lmslim.modelio.export import export_model  # noqa: E402
from lmslim.modelio.export.gguf import GGUFExportConfig  # noqa: E402
from lmslim.modelio.export.gguf_kquants import quantize_kquant  # noqa: E402
from lmslim.modelio.export.gguf_kquants_low import quantize_q5_1  # noqa: E402
from tests.modelio.test_export_gguf import tiny_llama  # noqa: E402


def _ggml_quantize(w: np.ndarray, kind: str, imp: np.ndarray | None) -> np.ndarray:
    """llama.cpp's own rounding of ``w`` (ggml_quantize_chunk of the engine's libggml-base), dequantized."""
    import llama_cpp
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    t = GGMLQuantizationType[kind.upper()]
    block, size = GGML_QUANT_SIZES[t]
    w = np.ascontiguousarray(w, np.float32)
    dst = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
    imp = None if imp is None else np.ascontiguousarray(imp, np.float32)
    lib.ggml_quantize_init(int(t))
    lib.ggml_quantize_chunk(int(t), w.ctypes.data, dst.ctypes.data, 0, w.shape[0], w.shape[1],
                            None if imp is None else imp.ctypes.data)
    return dequantize(dst, t)


@pytest.mark.parametrize("kind", ["q3_k", "q2_k", "q5_k", "q5_1", "q4_k"])
def test_rounding_error_is_below_llama_cpps_own_with_and_without_importance(kind):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    w[rng.integers(0, 64, 40), rng.integers(0, 1024, 40)] *= 8  # a few outliers, as trained weights have
    imp = rng.gamma(0.5, 2, 1024).astype(np.float32)
    for weights in (None, imp):
        wt = 1 if weights is None else weights
        mine = (quantize_q5_1 if kind == "q5_1" else lambda x, i: quantize_kquant(x, kind, i))(w, weights)[1]
        theirs = _ggml_quantize(w, kind, weights)
        assert float((((mine - w) ** 2) * wt).sum()) < float((((theirs - w) ** 2) * wt).sum())


@pytest.mark.parametrize("mix,ftype", [("q3_k_m", "Q3_K_M"), ("q2_k", "Q2_K")])
def test_mix_types_and_size_equal_llama_cpps_preset(tmp_path, mix, ftype):
    from gguf import GGUFReader

    from lmslim.measure.engines.llama_cpp_quantize import llama_quantize

    for name, (hidden, tied) in {"wide": (256, True), "narrow": (96, True), "untied": (256, False)}.items():
        m, tok = tiny_llama(hidden=hidden, ff=512, init=0.08, seed=1)
        if not tied:
            m.config.tie_word_embeddings = False
            m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
        f32, theirs, mine = (tmp_path / f"{name}-{x}.gguf" for x in ("f32", "theirs", "mine"))
        export_model(m, tok, "gguf", f32, GGUFExportConfig(type="f32"))
        llama_quantize(f32, theirs, ftype)
        export_model(m, tok, "gguf", mine, GGUFExportConfig(type=mix))
        types = [{t.name: t.tensor_type for t in GGUFReader(p).tensors} for p in (mine, theirs)]
        assert types[0] == types[1], name  # every tensor, fallbacks of the 96-wide rows included
        assert mine.stat().st_size == theirs.stat().st_size
