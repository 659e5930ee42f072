"""Pruning on the real SmolLM2-135M (small calibration and test slices, to stay within CI's time)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmslim.compress.prune import HeadsConfig, LayersConfig, MagnitudeConfig, NeuronsConfig, WandaConfig, prune_
from lmslim.modelio.formats.lmslim_sparse import save_pruned
from lmslim.modelio import load_model
from lmslim.data.calib import calibration_ids
from lmslim.data.spec import load_data
from lmslim.measure.eval import perplexity

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docs():
    return load_data("builtin:wiki:test").documents


@pytest.fixture(scope="module")
def calib():
    lm = load_model("builtin:smollm2-135m")
    return calibration_ids(lm.tokenizer, load_data("builtin:wiki:train").documents, 16, 256)


def test_wanda_beats_magnitude_at_50_percent(docs, calib):
    ppl = {}
    for name, cfg in (("magnitude", MagnitudeConfig(sparsity=0.5)), ("wanda", WandaConfig(sparsity=0.5))):
        lm = load_model("builtin:smollm2-135m")
        prune_(lm.model, cfg, calib)
        ppl[name] = perplexity(lm.model, lm.tokenizer, docs, max_tokens=2048)["perplexity"]
    assert ppl["wanda"] < ppl["magnitude"]


def test_gqa_heads_neurons_layers_save_and_reload_with_plain_transformers(tmp_path, calib):
    lm = load_model("builtin:smollm2-135m")
    prune_(lm.model, HeadsConfig(fraction=0.25), calib)  # 1 of 3 KV groups per layer: 6 of 9 query heads
    prune_(lm.model, NeuronsConfig(fraction=0.5), calib)
    prune_(lm.model, LayersConfig(drop=8), calib)
    cfg = lm.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.num_hidden_layers) == \
        (6, 2, 768, 22)
    save_pruned(lm.model, lm.tokenizer, tmp_path, compress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, lm.model(ids).logits)
    cached = plain.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, plain.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))
