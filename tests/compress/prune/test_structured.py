import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmslim.assets.tiny import build_tiny
from lmslim.compress.prune import HeadsConfig, LayersConfig, NeuronsConfig, prune_
from lmslim.modelio.formats.lmslim_sparse import save_pruned
from lmslim.compress.prune.api import linear_weight
from lmslim.compress.prune.structured import _complement, choose_removed, head_scores, neuron_scores
from lmslim.core.errors import UserError
from lmslim.modelio import load_model

CALIB = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(1))


def _gqa_llama(layers=3):
    """9 query heads over 3 KV heads, like SmolLM2."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=72, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_neuron_pruning_equals_masked_dense_model(name):
    model, _ = build_tiny(name)
    masked = copy.deepcopy(model)
    scores = neuron_scores(model, CALIB)
    prune_(model, NeuronsConfig(fraction=0.5), CALIB)
    removed = choose_removed(scores, 0.5, "layer", "neurons")
    for block, rem in zip(_blocks(masked), removed):
        down = block.mlp.down_proj if name == "tiny-llama" else block.mlp.c_proj
        linear_weight(down)[:, rem] = 0  # a neuron whose output column is zero contributes nothing
    assert torch.allclose(_logits(model), _logits(masked), atol=1e-5)
    inter = [linear_weight(b.mlp.down_proj if name == "tiny-llama" else b.mlp.c_proj).shape[1] for b in _blocks(model)]
    assert inter == [88, 88] if name == "tiny-llama" else inter == [128, 128]


def test_head_pruning_keeps_gqa_groups_and_equals_masked_dense_model():
    model = _gqa_llama()
    masked = copy.deepcopy(model)
    scores = head_scores(model, CALIB)
    report = prune_(model, HeadsConfig(fraction=0.25), CALIB)
    # 25% of 3 KV groups rounds half up to 1 group: 3 of 9 query heads (and 1 of 3 KV heads) per layer.
    assert report["heads_after"] == [6, 6, 6] and report["kv_heads_after"] == [2, 2, 2]
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 2
    assert model.config.head_dim == 8
    groups = [s.reshape(3, 3).sum(1) for s in scores]
    for block, g in zip(masked.model.layers, groups):
        gone = int(g.argmin())
        heads = torch.arange(gone * 3, gone * 3 + 3)
        cols = (heads.unsqueeze(1) * 8 + torch.arange(8)).reshape(-1)
        block.self_attn.o_proj.weight.data[:, cols] = 0  # those query heads add nothing; their KV head feeds only them
    assert torch.allclose(_logits(model), _logits(masked), atol=1e-5)


def test_gpt2_head_pruning_equals_masked_dense_model():
    model, _ = build_tiny("tiny-gpt2")
    masked = copy.deepcopy(model)
    scores = head_scores(model, CALIB)
    prune_(model, HeadsConfig(fraction=0.5), CALIB)
    for block, s in zip(masked.transformer.h, scores):
        for h in s.argsort()[:2].tolist():
            block.attn.c_proj.weight.data[h * 16:(h + 1) * 16] = 0  # Conv1D weight is (in, out)
    assert torch.allclose(_logits(model), _logits(masked), atol=1e-5)
    assert model.config.lmslim_structure["layers"][0]["num_attention_heads"] == 2  # GPT-2's config has no head_dim


def test_layer_drop_equals_identity_blocks_and_generates_with_kv_cache():
    model = _gqa_llama(layers=4)
    reference = copy.deepcopy(model)
    report = prune_(model, LayersConfig(drop=2), CALIB)
    assert len(report["dropped_layers"]) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    for i in report["dropped_layers"]:  # the dropped layers act as identities in the reference
        reference.model.layers[i].forward = lambda hidden_states, *a, **k: hidden_states
    assert torch.allclose(_logits(model), _logits(reference), atol=1e-5)
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_layer_drop_updates_layer_types():
    model = _gqa_llama(layers=4)
    model.config.layer_types = ["full_attention", "a", "b", "c"]
    report = prune_(model, LayersConfig(drop=1), CALIB)
    kept = [i for i in range(4) if i not in report["dropped_layers"]]
    assert model.config.layer_types == [["full_attention", "a", "b", "c"][i] for i in kept]


def test_block_influence_drops_a_near_identity_layer():
    model = _gqa_llama(layers=3)
    with torch.no_grad():  # layer 1 writes almost nothing into the residual stream: BI ≈ 0
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    report = prune_(model, LayersConfig(drop=1), CALIB)
    assert report["dropped_layers"] == [1]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_uniform_shapes_reload_with_plain_transformers(tmp_path, name):
    model, tok = build_tiny(name)
    prune_(model, NeuronsConfig(fraction=0.25), CALIB)
    if name == "tiny-llama":
        prune_(model, HeadsConfig(drop_heads=2), CALIB)
    prune_(model, LayersConfig(drop=1), CALIB)
    assert not hasattr(model.config, "lmslim_structure")
    save_pruned(model, tok, tmp_path, compress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(plain), _logits(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_non_uniform_shapes_reload_through_lmslim(tmp_path, name):
    model, tok = build_tiny(name)
    prune_(model, NeuronsConfig(fraction=0.3, scope="global"), CALIB)
    prune_(model, HeadsConfig(fraction=0.25, scope="global"), CALIB)
    assert model.config.lmslim_structure["layers"][0] != model.config.lmslim_structure["layers"][1]
    save_pruned(model, tok, tmp_path)
    lm = load_model(str(tmp_path))
    assert torch.equal(_logits(lm.model), _logits(model))
    lm.model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)


def test_global_scope_is_close_to_the_fraction_and_keeps_one_unit_per_layer():
    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.01, 0.02, 0.03])]
    removed = choose_removed(scores, 0.6, "global", "groups")  # round(5.4) = 5 of 9
    # Lowest first, but each layer keeps its best unit: layer 1's low-ranked unit fills the quota.
    assert [r.tolist() for r in removed] == [[0, 1], [0], [0, 1]]
    with pytest.raises(UserError, match="leave a layer with none"):
        choose_removed(scores, 0.8, "global", "groups")
    assert _complement(torch.tensor([0, 2]), 4).tolist() == [1, 3]


@pytest.mark.parametrize("cfg,message", [
    (HeadsConfig(drop_heads=9), "only 9"),
    (HeadsConfig(drop_heads=2), "multiple of 3"),
    (HeadsConfig(fraction=0.1), "rounds to none"),
    (HeadsConfig(fraction=0.9), "would leave none"),
    (LayersConfig(drop=3), "at least one must stay"),
    (LayersConfig(fraction=0.99), "at least one must stay"),
])
def test_bad_structured_requests(cfg, message):
    model = _gqa_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message):
        prune_(model, cfg, CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


@pytest.mark.parametrize("kwargs", [{"fraction": 1.0}, {"fraction": -0.2}, {"scope": "per-head"}])
def test_bad_structured_configs(kwargs):
    with pytest.raises(UserError):
        NeuronsConfig(**kwargs)
    with pytest.raises(UserError):
        LayersConfig()


def test_width_pruning_of_dead_channels_is_exact_and_reloads_plainly(tmp_path):
    from lmslim.compress.prune import WidthConfig

    model, tok = build_tiny("tiny-llama")
    for m in model.modules():  # the random tiny model's activations are so small that eps would dominate
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-12
    dead = torch.tensor([3, 10, 17, 40, 41, 50, 60, 63])  # 8 of 64 residual channels that nothing writes
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for block in model.model.layers:
            block.self_attn.o_proj.weight[dead] = 0
            block.mlp.down_proj.weight[dead] = 0
    before = _logits(model)
    report = prune_(model, WidthConfig(fraction=0.125), CALIB)
    assert report["hidden_after"] == 56 and model.config.hidden_size == 56
    # Removing all-zero channels changes nothing once the RMSNorm weights are rescaled by sqrt(H/H').
    assert torch.allclose(_logits(model), before, atol=1e-4)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    model.config.rms_norm_eps = 1e-12
    save_pruned(model, tok, tmp_path, compress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(plain), _logits(model))


def test_width_pruning_refuses_gpt2_and_everything():
    from lmslim.compress.prune import WidthConfig

    model, _ = build_tiny("tiny-gpt2")
    with pytest.raises(UserError, match="Llama-style"):
        prune_(model, WidthConfig(fraction=0.25), CALIB)
    with pytest.raises(UserError, match="in \\[0, 1\\)"):
        WidthConfig(fraction=1.0)
