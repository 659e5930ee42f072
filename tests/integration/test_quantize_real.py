"""Quantization on the real SmolLM2-135M (small slices, to stay within CI's time)."""

import pytest
import torch

from lmslim.compress.quantize import DynamicInt8Config, RTNConfig, quantize_
from lmslim.nn.quant_linear import QuantLinear
from lmslim.modelio import load_model
from lmslim.data.spec import load_data
from lmslim.measure.eval import perplexity

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docs():
    return load_data("builtin:wiki:test").documents


def test_release_grid_makes_w4_g32_asymmetric_lossless():
    # SmolLM2's released weights are dequantized Q4_1: RTN on that exact grid must reproduce them.
    # This is why lmslim never reports w4 g32 asymmetric on this model as a compression result.
    lm = load_model("builtin:smollm2-135m")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.17.mlp.down_proj"]
    before = {n: lm.model.get_submodule(n).weight.detach().clone() for n in names}
    quantize_(lm.model, RTNConfig(bits=4, group_size=32, symmetric=False, minmax=True, kernel="dequant",
                                     targets=tuple(names)))
    for n in names:
        q = lm.model.get_submodule(n)
        assert isinstance(q, QuantLinear)
        assert torch.allclose(q.dequantized_weight(), before[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel,bound", [
    ("int8", 0.03),  # exact W8A8 with 8-bit asymmetric per-token activations
    # fbgemm: 7-bit activations where its int16 pair sums would overflow (AVX2 without VNNI), which
    # costs quality; with 8-bit activations (VNNI CPUs) it meets the int8 kernel's bound.
    ("fbgemm", 0.08),
])
def test_dynamic_int8_perplexity_close_to_fp32(docs, kernel, bound):
    from lmslim.nn.quant_linear import fbgemm_saturates

    lm = load_model("builtin:smollm2-135m")
    base = perplexity(lm.model, lm.tokenizer, docs, max_tokens=1024)["perplexity"]
    quantize_(lm.model, DynamicInt8Config(kernel=kernel))
    q = perplexity(lm.model, lm.tokenizer, docs, max_tokens=1024)["perplexity"]
    print(f"dynamic int8, {kernel} kernel (7-bit activations: {fbgemm_saturates()}): {q / base - 1:+.2%}")
    assert q / base - 1 < (bound if kernel == "int8" or fbgemm_saturates() else 0.03)
