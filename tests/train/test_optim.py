import pytest
import torch

from lmslim.assets.tiny import build_tiny
from lmslim.train.config import OptimConfig, ScheduleConfig
from lmslim.train.optim import build_optimizer, build_scheduler, lr_factor


def _groups(model, **kw):
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(weight_decay=0.1, **kw), [model])
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["group"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_no_decay_on_norms_biases_and_optionally_embeddings():
    model, _ = build_tiny("tiny-gpt2")  # has biases, LayerNorms, token+position embeddings
    g = _groups(model)
    assert all(".ln_" in n or n.endswith(".bias") or "ln_f" in n for n in g["no_decay"])
    assert "transformer.wte.weight" in g["decay"]
    g = _groups(model, decay_embeddings=False)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= g["no_decay"]
    llama, _ = build_tiny("tiny-llama")
    g = _groups(llama)
    assert "model.norm.weight" in g["no_decay"] and "model.layers.0.input_layernorm.weight" in g["no_decay"]
    assert "model.layers.0.self_attn.q_proj.weight" in g["decay"]


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("adam", {}), ("adagrad", {}), ("rmsprop", {"momentum": 0.9}),
                                     ("sgd", {"momentum": 0.9, "nesterov": True})])
def test_every_optimizer_steps(name, kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    opt = build_optimizer(list(lin.named_parameters()), OptimConfig(name=name, lr=0.1, **kw), [lin])
    before = lin.weight.detach().clone()
    lin(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, lin.weight)


def test_schedules():
    total = 10
    warm = ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # monotone decay after warmup
    assert 0.1 < f[-1] < 0.2
    lin = [lr_factor(s, ScheduleConfig(name="linear"), total) for s in range(total)]
    assert lin[0] == 1.0 and abs(lin[5] - 0.5) < 1e-9
    assert {lr_factor(s, ScheduleConfig(name="constant"), total) for s in range(total)} == {1.0}
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, warm, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * x for x in f])


@pytest.mark.parametrize("name,kw", [("adamw", {"weight_decay": 0.1}), ("adam", {}), ("adagrad", {}),
                                     ("sgd", {"momentum": 0.9, "nesterov": True})])
def test_fused_step_matches_the_per_tensor_loop(name, kw):
    """optim.fused=auto picks torch's fused kernel on CPU; the trajectory equals the plain loop's up to rounding."""
    models, opts = [], []
    for fused in ("auto", "false"):
        torch.manual_seed(0)
        model, _ = build_tiny("tiny-llama")
        opt = build_optimizer(list(model.named_parameters()), OptimConfig(name=name, lr=1e-2, fused=fused, **kw),
                              [model])
        models.append(model)
        opts.append(opt)
    assert opts[0].defaults.get("fused") is True and not opts[1].defaults.get("fused")
    ids = torch.randint(3, 200, (2, 12))
    for _ in range(4):
        for model, opt in zip(models, opts):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    moved = any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), build_tiny("tiny-llama")[0].parameters()))
    assert moved


def test_fused_true_is_refused_where_torch_has_none():
    from lmslim.core.errors import UserError

    with pytest.raises(UserError, match="fused"):
        OptimConfig(name="rmsprop", fused=True)
    lin = torch.nn.Linear(4, 2, device="meta")
    with pytest.raises(UserError, match="no fused"):
        build_optimizer(list(lin.named_parameters()), OptimConfig(fused="true"), [lin])
    assert not build_optimizer(list(lin.named_parameters()), OptimConfig(), [lin]).defaults.get("fused")
