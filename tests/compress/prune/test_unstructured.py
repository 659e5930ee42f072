import pytest
import torch

from lmslim.assets.tiny import build_tiny
from lmslim.compress.prune import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_
from lmslim.compress.prune.api import keep_mask, linear_weight
from lmslim.compress.prune.sparsegpt import sparsegpt_prune
from lmslim.compress.prune.wanda import wanda_scores
from lmslim.core.errors import UserError
from lmslim.core.targeting import select_linears

CALIB = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))


def _zeros(w):
    return int((w == 0).sum())


def test_keep_mask_counts_are_exact_even_with_ties():
    scores = torch.ones(6, 16)  # all equal: the count must still be exact
    assert _zeros(keep_mask(scores, 0.5).float()) == 48
    per_row = keep_mask(torch.rand(6, 16), 0.25, per_row=True)
    assert ((~per_row).sum(1) == 4).all()
    nm = keep_mask(scores, 0, (2, 4))
    assert (nm.reshape(6, 4, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_magnitude_per_layer_reaches_exact_sparsity_with_overrides(model_name):
    model, _ = build_tiny(model_name)
    cfg = MagnitudeConfig(sparsity=0.5, overrides=(("*.mlp.*", 0.25),))
    report = prune_(model, cfg)
    for name, mod in select_linears(model):
        w = linear_weight(mod)
        expected = 0.25 if ".mlp." in name else 0.5
        assert _zeros(w) == round(expected * w.numel()), name
        assert report["module_sparsity"][name] == pytest.approx(expected, abs=1e-4)
    assert model.config.lmslim_pruning["steps"][0]["method"] == "magnitude"


def test_magnitude_global_prunes_small_matrices_more():
    model, _ = build_tiny("tiny-llama")
    with torch.no_grad():  # make one matrix's weights tiny: a global threshold should take most of it
        model.model.layers[0].mlp.up_proj.weight.mul_(0.01)
    report = prune_(model, MagnitudeConfig(sparsity=0.4, scope="global"))
    assert report["sparsity"] == pytest.approx(0.4, abs=1e-4)
    assert report["module_sparsity"]["model.layers.0.mlp.up_proj"] > 0.99


@pytest.mark.parametrize("cfg", [MagnitudeConfig(n_m="2:4"), WandaConfig(n_m="2:4"), SparseGPTConfig(n_m="2:4"),
                                 WandaConfig(n_m=(4, 8)), SparseGPTConfig(n_m="4:8")])
def test_n_m_pattern_holds_in_every_group(cfg):
    model, _ = build_tiny("tiny-llama")
    prune_(model, cfg, CALIB)
    n, m = cfg.n_m
    for name, mod in select_linears(model):
        w = linear_weight(mod)
        nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (nonzero <= n).all(), name
        assert (nonzero == n).float().mean() > 0.99, name  # only exact zeros in the data may add more


@pytest.mark.parametrize("cfg", [WandaConfig(sparsity=0.6), SparseGPTConfig(sparsity=0.6)])
def test_calibrated_methods_reach_target_sparsity(cfg):
    model, _ = build_tiny("tiny-gpt2")
    report = prune_(model, cfg, CALIB)
    assert report["sparsity"] == pytest.approx(0.6, abs=0.01)  # per-row counts round to whole weights
    assert report["magnitude_modules"] == []


def _layer_problem(seed=0, n=512, k=64, out=32):
    gen = torch.Generator().manual_seed(seed)
    # Features with very different scales, mixed so they correlate, as in real LLM activations.
    z = torch.randn(n, k, generator=gen) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    x = z @ (torch.eye(k) + 0.5 * torch.randn(k, k, generator=gen) / k ** 0.5)
    w = torch.randn(out, k, generator=gen)
    return x, w


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_reconstruction_error_sparsegpt_le_wanda_le_magnitude(n_m):
    x, w = _layer_problem()
    h = 2 * x.t() @ x / x.shape[0]
    err = lambda w_hat: float(((w - w_hat) @ x.t()).pow(2).sum())  # noqa: E731
    mag = w * keep_mask(w.abs(), 0.5, n_m, per_row=True)
    wanda = w * keep_mask(wanda_scores(w, (x * x).sum(0)), 0.5, n_m, per_row=True)
    sgpt = sparsegpt_prune(w, h, 0.5, n_m, damp=0.01, block_size=16)
    assert _zeros(sgpt) >= w.numel() // 2 - 1
    assert err(sgpt) <= err(wanda) <= err(mag)
    assert err(sgpt) < 0.7 * err(wanda)  # the weight update really reconstructs


def test_sparsegpt_at_zero_sparsity_keeps_weights():
    x, w = _layer_problem(seed=1)
    out = sparsegpt_prune(w, 2 * x.t() @ x / x.shape[0], 0.0, damp=0.01, block_size=16)
    assert torch.allclose(out, w, atol=1e-4)


def test_wanda_uses_already_pruned_blocks_outputs(monkeypatch):
    # Sequential calibration: block 1's input norms must come from the pruned block 0, which differ
    # from the dense model's. Record the norms Wanda sees for block 1's q_proj.
    import lmslim.compress.prune.wanda as wanda_mod

    seen = {}
    real = wanda_mod.wanda_scores

    def spy(weight, sq):
        seen.setdefault(weight.data_ptr(), sq.clone())
        return real(weight, sq)

    monkeypatch.setattr(wanda_mod, "wanda_scores", spy)
    model, _ = build_tiny("tiny-llama")
    q1 = model.model.layers[1].self_attn.q_proj
    dense_sq = torch.zeros(q1.in_features)

    def record(_mod, args):
        dense_sq.add_(args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0))

    h = q1.register_forward_pre_hook(record)
    model(input_ids=CALIB)
    h.remove()
    prune_(model, WandaConfig(sparsity=0.5), CALIB)
    pruned_sq = seen[model.model.layers[1].self_attn.q_proj.weight.data_ptr()]
    assert not torch.allclose(pruned_sq, dense_sq, rtol=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
    ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
    ({"n_m": "4:4"}, "0 < N < M"),
    ({"n_m": "3:2"}, "0 < N < M"),
    ({"n_m": "two:four"}, "must look like 2:4"),
    ({"overrides": (("*", 1.5),)}, "must be in [0, 1)"),
    ({"n_m": "2:4", "overrides": (("*", 0.3),)}, "do not combine"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        WandaConfig(**kwargs)


def test_n_m_needs_divisible_widths_and_calibration():
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(UserError, match="divisible by 128"):
        prune_(model, MagnitudeConfig(n_m="2:128"))
    with pytest.raises(UserError, match="needs calibration"):
        prune_(model, WandaConfig())
    with pytest.raises(UserError, match="no eligible layers"):
        prune_(model, MagnitudeConfig(ignore=("*",)))
