import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmslim.assets.tiny import build_tiny
from lmslim.measure import cost


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("seq_len", [32, 128])
def test_forward_flops_match_flop_counter(name, seq_len):
    model, _ = build_tiny(name)
    # Eager attention runs QK^T and attention·V as matmuls, which the flop counter sees.
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    ids = torch.randint(10, 200, (2, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    measured = counter.get_total_flops()
    predicted = cost.forward_flops(cost.shape_of(model), seq_len, batch=2)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_tied_embedding_counted_once_and_read_as_lm_head():
    model, _ = build_tiny("tiny-llama")  # tied
    shape = cost.shape_of(model)
    assert shape.params == sum(p.numel() for p in model.parameters())  # parameters() de-duplicates ties
    emb = model.get_input_embeddings().weight
    assert shape.weight_bytes >= emb.numel() * 4  # the tied head reads the whole table
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, dim 16, fp32


def test_untied_input_embedding_not_read_per_token():
    model, _ = build_tiny("tiny-bert")
    shape = cost.shape_of(model)
    emb_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = sum(p.numel() * 4 for p in model.parameters())
    assert shape.weight_bytes == total - emb_bytes


def test_nonzero_counts_zeros():
    model, _ = build_tiny("tiny-llama")
    before = cost.shape_of(model).nonzero_params
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    assert cost.shape_of(model).nonzero_params == before - 176 * 64


def test_training_cost_formula():
    assert cost.training_cost(forward=10.0, samples=4, epochs=3) == 3 * 4 * (10 + 20)
    assert cost.training_cost(forward=10.0, samples=1, backward=5.0) == 15
    shape = cost.shape_of(build_tiny("tiny-llama")[0])
    assert cost.training_flops_per_token(shape, 64) == 3 * cost.forward_flops(shape, 64) // 64
    assert cost.flops_per_token(shape, 0) == 2 * shape.linear_params + cost.attention_flops(shape, 1, 1)


def _calib(model):
    return torch.randint(10, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_rounding_zeros_are_not_sparsity(method):
    from lmslim.compress.quantize import GPTQConfig, quantize_
    from lmslim.compress.quantize.rtn import RTNConfig

    model, _ = build_tiny("tiny-llama")
    cfg = RTNConfig(bits=4, symmetric=True) if method == "rtn" else GPTQConfig(bits=4, symmetric=True)
    quantize_(model, cfg, _calib(model))
    q = [m for m in model.modules() if hasattr(m, "cost_profile")]
    # The 4-bit codes do hold many exact zeros (weights rounded to the grid's 0.0) ...
    zeros = sum(int((m.dequantized_weight() == 0).sum()) for m in q)
    assert zeros > 0.05 * sum(m.in_features * m.out_features for m in q)
    # ... but no weight was removed: every logical parameter counts as non-zero.
    shape = cost.shape_of(model)
    float_zeros = sum(int((p == 0).sum()) for p in model.parameters())  # e.g. the padding embedding row
    assert shape.nonzero_params == shape.params - float_zeros


def test_pruned_then_quantized_keeps_its_sparsity():
    from lmslim.compress.prune import WandaConfig, prune_
    from lmslim.compress.quantize import quantize_
    from lmslim.compress.quantize.rtn import RTNConfig

    model, _ = build_tiny("tiny-llama")
    prune_(model, WandaConfig(sparsity=0.5), _calib(model))
    pruned = cost.shape_of(model)
    assert pruned.nonzero_params < 0.7 * pruned.params
    # The default asymmetric grid: a pruned zero dequantizes to a tiny value, not exactly 0.0.
    quantize_(model, RTNConfig(bits=4), _calib(model))
    shape = cost.shape_of(model)
    # Every pruned zero still counts; a few small weights rounded into the zero bin may add to them.
    assert 0.85 * pruned.nonzero_params < shape.nonzero_params <= pruned.nonzero_params
