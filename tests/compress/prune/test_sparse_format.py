import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmslim.assets.tiny import build_tiny
from lmslim.compress.prune import MagnitudeConfig, NeuronsConfig, SparseGPTConfig, prune_
from lmslim.modelio.formats.lmslim_sparse import save_pruned
from lmslim.modelio.formats.lmslim_sparse import decode, encode
from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.measure.bench import BenchConfig, bench

CALIB = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_encode_decode_is_bit_exact():
    t = torch.randn(7, 13)
    t[t.abs() < 0.8] = 0
    t[0, 0] = -0.0
    mask, values = encode(t)
    assert mask.dtype == torch.uint8 and mask.numel() == (7 * 13 + 7) // 8
    back = decode(mask, values, [7, 13])
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))  # bit patterns, -0.0 included
    with pytest.raises(UserError, match="damaged"):
        decode(mask, values[:-1], [7, 13])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_compressed_save_reloads_bit_identical_and_is_smaller(tmp_path, name):
    model, tok = build_tiny(name)
    prune_(model, SparseGPTConfig(n_m="2:4"), CALIB)
    sparse = save_pruned(model, tok, tmp_path / "sparse")
    dense = save_pruned(model, tok, tmp_path / "dense", compress=False)
    assert sparse["compressed_tensors"] > 0 and dense["compressed_tensors"] == 0
    # 50% zeros in the block matrices: values + a 1/32 bitmask, the embeddings stay dense.
    assert sparse["bytes"] < 0.85 * dense["bytes"]
    cfg = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert cfg["lmslim_sparsity"]["format"] == 1 and cfg["lmslim_pruning"]["n_m"] == "2:4"
    reloaded = load_model(str(tmp_path / "sparse")).model
    assert torch.equal(_logits(reloaded), _logits(model))
    assert not hasattr(reloaded.config, "lmslim_sparsity")  # dense in memory: a plain re-save stays valid
    reloaded.save_pretrained(tmp_path / "resaved")
    tok.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_logits(load_model(str(tmp_path / "resaved")).model), _logits(model))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()  # dense folder: any tool reads it
    assert torch.equal(_logits(plain), _logits(model))


def test_structured_and_sparse_together_reload(tmp_path):
    model, tok = build_tiny("tiny-llama")
    prune_(model, NeuronsConfig(fraction=0.3, scope="global"), CALIB)
    prune_(model, MagnitudeConfig(sparsity=0.6), CALIB)
    save_pruned(model, tok, tmp_path / "sparse")
    lm = load_model(str(tmp_path / "sparse"))
    assert torch.equal(_logits(lm.model), _logits(model))
    steps = [s["method"] for s in lm.model.config.lmslim_pruning["steps"]]
    assert steps == ["neurons", "magnitude"]


def test_bench_says_no_speedup_for_sparse_weights(tmp_path):
    model, tok = build_tiny("tiny-llama")
    prune_(model, MagnitudeConfig(sparsity=0.5, include_lm_head=False), CALIB)
    save_pruned(model, tok, tmp_path / "sparse")
    r = bench(load_model(str(tmp_path / "sparse")), BenchConfig(prompt_len=8, gen_len=4, repeats=1, warmup=0))
    assert any("no speedup on this device" in n for n in r["notes"])
    model, tok = build_tiny("tiny-llama")
    prune_(model, MagnitudeConfig(n_m="2:4"), CALIB)
    save_pruned(model, tok, tmp_path / "dense")
    r = bench(load_model(str(tmp_path / "dense")), BenchConfig(prompt_len=8, gen_len=4, repeats=1, warmup=0))
    assert any("2:4" in n and "no speedup on this device" in n for n in r["notes"])


@pytest.mark.parametrize("cfg", [MagnitudeConfig(sparsity=0.5), MagnitudeConfig(sparsity=0.5, scope="global")])
def test_pruned_zeros_are_positive_zeros_so_they_are_not_stored(tmp_path, cfg):
    from lmslim.compress.prune import WandaConfig
    from lmslim.compress.prune.api import linear_weight
    from lmslim.core.targeting import select_linears

    for c in (cfg, WandaConfig(n_m="2:4")):
        model, tok = build_tiny("tiny-llama")
        prune_(model, c, CALIB)
        for name, mod in select_linears(model):
            w = linear_weight(mod)
            assert int((w.contiguous().view(torch.int32) == 0).sum()) == int((w == 0).sum()), name  # no -0.0
