import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmslim.assets.tiny import build_tiny, byte_tokenizer
from lmslim.modelio.formats.lmslim_shared import save_shared
from lmslim.compress.share import ShareConfig, share_, unique_params
from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.measure.cost import flops_per_token, shape_of


def _llama(layers=5):
    tok = byte_tokenizer("causal")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), tok


def _block_params(block, norms):
    return sum(p.numel() for n, p in block.named_parameters() if ("norm" in n) == norms)


def test_parameter_count_drops_by_expected_amount():
    model, _ = _llama(5)
    per_block = _block_params(model.model.layers[0], norms=False)
    before = unique_params(model)
    shape_before = shape_of(model)
    report = share_(model, ShareConfig(group_size=2))
    assert report["groups"] == [[0, 1], [2, 3], [4]]
    # Groups [0,1] and [2,3] each store one block's non-norm weights instead of two.
    assert before - unique_params(model) == 2 * per_block
    assert report["params_before"] - report["params_after"] == 2 * per_block
    shape_after = shape_of(model)
    assert shape_after.params == report["params_after"]  # the cost model counts unique parameters
    assert flops_per_token(shape_after, 64) == flops_per_token(shape_before, 64)  # FLOPs do not drop
    assert shape_after.weight_bytes == shape_before.weight_bytes  # each layer still reads its weights
    layers = model.model.layers
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight
    assert layers[2].self_attn.q_proj.weight is not layers[1].self_attn.q_proj.weight
    assert layers[0].input_layernorm.weight is not layers[1].input_layernorm.weight  # norms kept per layer


def test_init_mean_first_index():
    model, _ = _llama(4)
    w = [model.model.layers[i].mlp.down_proj.weight.detach().clone() for i in range(4)]
    mean = _llama(4)[0]
    share_(mean, ShareConfig(group_size=2, init="mean"))
    assert torch.allclose(mean.model.layers[1].mlp.down_proj.weight, (w[0] + w[1]) / 2)
    first = _llama(4)[0]
    share_(first, ShareConfig(group_size=2, init="first"))
    assert torch.equal(first.model.layers[3].mlp.down_proj.weight, w[2])
    idx = _llama(4)[0]
    share_(idx, ShareConfig(group_size=2, init="index", index=1, keep_norms=False))
    assert torch.equal(idx.model.layers[0].mlp.down_proj.weight, w[1])
    assert idx.model.layers[0].input_layernorm.weight is idx.model.layers[1].input_layernorm.weight


def test_shared_gradients_accumulate_once():
    model, _ = _llama(2)
    share_(model, ShareConfig(group_size=2))
    ids = torch.randint(3, 200, (1, 8))
    model(ids, labels=ids).loss.backward()
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)  # the optimizer sees each shared tensor once
    assert model.model.layers[0].mlp.up_proj.weight.grad is model.model.layers[1].mlp.up_proj.weight.grad


def test_save_reload_identical_and_stored_once(tmp_path):
    model, tok = _llama(4)
    share_(model, ShareConfig(group_size=2))
    ids = tok("sharing weights across layers", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    for saver, folder in ((save_shared, tmp_path / "ours"), (None, tmp_path / "hf")):
        folder.mkdir()
        if saver is None:  # transformers' own save (e.g. from a training loop) must also dedupe
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
        else:
            saver(model, tok, folder)
        keys = set(load_file(str(folder / "model.safetensors")))
        assert "model.layers.0.mlp.up_proj.weight" in keys and "model.layers.1.mlp.up_proj.weight" not in keys
        assert "model.layers.1.input_layernorm.weight" in keys  # per-layer norms are stored
        stored = sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())
        assert stored == unique_params(model)
        lm = load_model(str(folder))
        again = lm.model
        assert again.model.layers[2].self_attn.o_proj.weight is again.model.layers[3].self_attn.o_proj.weight
        assert unique_params(again) == unique_params(model)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, ref)


def test_bad_share_input():
    for kw in ({"group_size": 1}, {"init": "median"}, {"group_size": 2, "index": 2}):
        with pytest.raises(UserError):
            ShareConfig(**kw)
    model, _ = _llama(2)
    with pytest.raises(UserError, match="fewer than"):
        share_(model, ShareConfig(group_size=3))
    share_(model, ShareConfig(group_size=2))
    with pytest.raises(UserError, match="already shares"):
        share_(model, ShareConfig(group_size=2))


def test_share_gpt2_and_bert_run():
    for name in ("tiny-gpt2", "tiny-bert"):
        model, tok = build_tiny(name)
        report = share_(model, ShareConfig(group_size=2))
        assert report["params_after"] < report["params_before"]
        with torch.no_grad():
            model(tok("hello", return_tensors="pt").input_ids)
