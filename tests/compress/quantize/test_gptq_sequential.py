import torch

from lmslim.assets.tiny import build_tiny
from lmslim.compress.calibration import capture_block_inputs, transformer_blocks
from lmslim.compress.quantize import GPTQConfig, quantize_
from lmslim.compress.quantize.gptq import input_groups, run_block_until
from lmslim.core.targeting import is_linear_like


def first_block(kind):
    model, _ = build_tiny(kind)
    model.config.use_cache = False
    _, blocks = transformer_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], torch.randint(10, 200, (4, 32)), 2)
    mods = {n: m for n, m in blocks[0].named_modules() if is_linear_like(m)}
    return blocks[0], mods, inputs


def test_groups_follow_call_order_and_shared_inputs():
    block, mods, inputs = first_block("tiny-llama")
    assert input_groups(block, mods, inputs[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    block, mods, inputs = first_block("tiny-gpt2")
    assert input_groups(block, mods, inputs[0]) == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]


def test_run_block_until_stops_after_the_wanted_modules():
    block, mods, inputs = first_block("tiny-llama")
    seen = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen.append(n)) for n, m in mods.items()]
    run_block_until(block, inputs[0], [mods["self_attn.v_proj"]])
    for h in handles:
        h.remove()
    assert "self_attn.v_proj" in seen and "self_attn.o_proj" not in seen and "mlp.down_proj" not in seen


def test_true_sequential_changes_what_later_matrices_are_calibrated_on():
    calib = torch.randint(10, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    codes = {}
    for seq in (True, False):
        model, _ = build_tiny("tiny-llama")
        quantize_(model, GPTQConfig(bits=4, group_size=32, true_sequential=seq), calib)
        codes[seq] = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    # The first matrices of block 0 see identical inputs either way; the down projection does not.
    q0 = "model.layers.0.self_attn.q_proj.qweight"
    d0 = "model.layers.0.mlp.down_proj.qweight"
    assert torch.equal(codes[True][q0], codes[False][q0])
    assert not torch.equal(codes[True][d0], codes[False][d0])


def test_clip_search_never_increases_rounding_error():
    from lmslim.nn.scheme import Scheme, dequantize, quantize_weight

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    w[:, 7] *= 8  # an outlier column: clipping it helps the other weights of its groups
    for scheme in (Scheme(4, 128, False), Scheme(4, 64, True), Scheme(3, None, False)):
        errs = []
        for search in (False, True):
            q, s, o = quantize_weight(w, scheme, clip_search=search)
            errs.append(((dequantize(q, s, o, scheme.group(256)) - w) ** 2).sum(1))
        assert torch.all(errs[1] <= errs[0] + 1e-6) and errs[1].sum() < errs[0].sum()
