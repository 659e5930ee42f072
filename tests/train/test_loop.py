import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lmslim.assets.tiny import build_tiny
from lmslim.core.errors import UserError
from lmslim.train import checkpoint as ckpt
from lmslim.train.config import TrainConfig
from lmslim.train.data import collate, tokenize
from lmslim.train.loop import TrainingDiverged, accumulate, enable_activation_checkpointing, task_loss, train
from lmslim.train.metrics import read_metrics


def _cfg(**over):
    base = {"max_steps": 8, "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
            "batch": {"batch_size": 2, "max_length": 32}, "log": {"every_steps": 1}}
    return TrainConfig.from_dict(base, [f"{k}={v}" for k, v in over.items()])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_one_big_batch(rt, docs):
    """k variable-length micro-batches weighted by their token share == one batch holding all rows."""
    model, tok = build_tiny("tiny-llama")
    model.train()
    ts = tokenize(docs, tok, "clm", max_length=64, pack=False)
    rows = ts.examples[:6]
    micro = [collate(rows[:1], "clm", ts.pad_id), collate(rows[1:4], "clm", ts.pad_id),
             collate(rows[4:], "clm", ts.pad_id)]
    assert len({m.units for m in micro}) > 1  # really variable-length
    scaler = rt.grad_scaler()
    loss_acc, _ = accumulate(model, micro, task_loss, rt, scaler)
    g_acc = _grads(model)
    model.zero_grad()
    loss_big, _ = accumulate(model, [collate(rows, "clm", ts.pad_id)], task_loss, rt, scaler)
    g_big = _grads(model)
    assert torch.allclose(loss_acc, loss_big, rtol=1e-5, atol=1e-6)
    for n in g_big:  # stated tolerance: fp32 summation order only
        assert torch.allclose(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6), n
    # The naive loss/k average would NOT match for these unequal micro-batches.
    model.zero_grad()
    for m in micro:
        (task_loss(model, m)[0] / len(micro)).backward()
    naive = _grads(model)
    assert max((naive[n] - g_big[n]).abs().max() for n in g_big) > 1e-4


def test_activation_checkpointing_same_gradients(rt, docs):
    model, tok = build_tiny("tiny-llama")
    model.train()
    ts = tokenize(docs, tok, "clm", max_length=64)
    batch = collate(ts.examples[:3], "clm", ts.pad_id)
    task_loss(model, batch)[0].backward()
    plain = _grads(model)
    model.zero_grad()
    enable_activation_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    task_loss(model, batch)[0].backward()
    for n, g in _grads(model).items():
        assert torch.allclose(g, plain[n], rtol=1e-5, atol=1e-7), n


def _run(tmp_path, docs, rt, stop_at=None, resume=False, model_name="tiny-gpt2", **over):
    model, tok = build_tiny(model_name)  # same seeded weights every call; GPT-2 has dropout (RNG matters)
    few = type(docs)("few", "clm", documents=docs.documents[:6])  # small: 8 steps cross an epoch boundary
    ts = tokenize(few, tok, "clm", max_length=32, pack=True)
    cfg = _cfg(**{"batch.grad_accum": 2, "checkpoint.every_steps": 3, **over})
    cbs = [lambda step, rec: step == stop_at] if stop_at else []
    return train(model, ts, cfg, rt, out_dir=tmp_path, resume=resume, callbacks=cbs, save_final=False), model


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, docs, rt):
    full, m_full = _run(tmp_path / "full", docs, rt)
    assert full.steps == 8
    part, _ = _run(tmp_path / "split", docs, rt, stop_at=5)
    assert part.steps == 5 and part.losses == full.losses[:5]
    rest, m_rest = _run(tmp_path / "split", docs, rt, resume=True)
    assert rest.steps == 8
    assert part.losses + rest.losses == full.losses  # bit-exact on CPU
    for (n, a), (_, b) in zip(m_full.state_dict().items(), m_rest.state_dict().items()):
        assert torch.equal(a, b), n
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # one record per step, none duplicated by the resume
    # The data stream crossed an epoch boundary, so the resumed data position mattered.
    assert read_metrics(tmp_path / "full" / "metrics.jsonl")[-1]["epoch"] >= 1


def test_resume_refuses_other_model_or_config(tmp_path, docs, rt):
    _run(tmp_path, docs, rt, stop_at=3)
    with pytest.raises(UserError, match=r"different training config \(optim.lr\)"):
        _run(tmp_path, docs, rt, resume=True, **{"optim.lr": 0.1})
    with pytest.raises(UserError, match="another model"):
        _run(tmp_path, docs, rt, resume=True, model_name="tiny-llama")
    # Changing only the length of the run is allowed.
    r, _ = _run(tmp_path, docs, rt, resume=True, max_steps=4)
    assert r.steps == 4


def test_checkpoint_loads_with_weights_only(tmp_path, docs, rt):
    _run(tmp_path, docs, rt, max_steps=3)
    folder = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng", "loop"} and state["loop"]["step"] == 3
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".partial")]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, docs, rt):
    model, tok = build_tiny("tiny-llama")
    ts = tokenize(docs, tok, "clm", max_length=32)
    calls = {"n": 0}

    def objective(m, batch):
        calls["n"] += 1
        loss = m(**batch).loss
        return (loss * float("nan") if calls["n"] >= 3 else loss), {}

    # Step 3's loss is the first computed from step 2's weights: that checkpoint is pending until a healthy
    # step confirms it, so it goes, and the message names step 1.
    with pytest.raises(TrainingDiverged, match=r"step 3: the training loss became nan.*last good checkpoint is "
                                               r".*step-0000001 \(step 1\); removed step-0000002"):
        train(model, ts, _cfg(**{"checkpoint.every_steps": 1}), rt, objective=objective, out_dir=tmp_path)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-0000001"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied
    assert not (tmp_path / "model.safetensors").exists()


class HiddenKD(torch.nn.Module):
    """A toy distillation objective: task loss + MSE of projected student hidden states to a frozen teacher's."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, model, batch):
        out = model(**batch, output_hidden_states=True)
        with torch.no_grad():
            target = self.teacher(**batch, output_hidden_states=True).hidden_states[-1]
        mse = F.mse_loss(self.proj(out.hidden_states[-1]), target)
        return out.loss + mse, {"mse": float(mse.detach())}


def test_module_objective_trains_and_checkpoints_its_parameters(tmp_path, docs, rt):
    student, tok = build_tiny("tiny-llama")
    teacher, _ = build_tiny("tiny-llama")
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = HiddenKD(teacher)
    proj_before = kd.proj.weight.detach().clone()
    ts = tokenize(docs, tok, "clm", max_length=32)
    r = train(student, ts, _cfg(max_steps=3), rt, objective=kd, out_dir=tmp_path)
    assert not torch.equal(kd.proj.weight, proj_before)  # the projection was trained
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())  # teacher frozen
    folder = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    with safe_open(str(folder / "extra.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["objective.proj.bias", "objective.proj.weight"]
    assert "mse" in read_metrics(tmp_path / "metrics.jsonl")[-1] and r.steps == 3


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, docs, rt, mode, caplog):
    model, tok = build_tiny("tiny-llama")
    ts = tokenize(docs, tok, "clm", max_length=32)
    records = []
    with caplog.at_level("WARNING"):
        r = train(model, ts, _cfg(max_steps=3, **{"precision.mode": mode}), rt,
                  callbacks=[lambda s, rec: records.append(rec)])
    assert "slower than fp32" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(r.losses)))
    assert ("loss_scale" in records[-1]) == (mode == "fp16")


def test_autocast_runs_in_the_chosen_dtype(rt):
    lin = torch.nn.Linear(4, 4)
    for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        r = rt.with_precision(mode)
        with r.autocast():
            assert lin(torch.randn(2, 4)).dtype == dtype
        assert r.needs_grad_scaler == (mode == "fp16") and r.grad_scaler().is_enabled() == (mode == "fp16")
    assert rt.with_precision("auto").precision == "fp32"  # CPU default


def test_early_stopping_keeps_best(tmp_path, docs, rt):
    model, tok = build_tiny("tiny-llama")
    ts = tokenize(docs, tok, "clm", max_length=32)
    values = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    weights_at = {}
    cfg = _cfg(**{"eval.every_steps": 1, "early_stop.patience": 2, "early_stop.metric": "eval_loss"})
    r = train(model, ts, cfg, rt, evaluator=lambda m: {"eval_loss": next(values)}, out_dir=tmp_path,
              callbacks=[lambda s, rec: weights_at.setdefault(s, model.lm_head.weight.detach().clone())])
    assert r.stopped_early and r.steps == 4 and r.best_step == 2 and r.best_metric == 0.5
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    key = "lm_head.weight" if "lm_head.weight" in saved else "model.embed_tokens.weight"
    assert torch.equal(saved[key], weights_at[2])  # the final model is the best one, not the last
    assert (tmp_path / "best" / "config.json").is_file()
    with pytest.raises(UserError, match="early_stop.metric 'accuracy' is not measured"):
        train(model, ts, _cfg(**{"early_stop.metric": "accuracy"}), rt, eval_data=ts)


def test_metrics_jsonl_and_tensorboard(tmp_path, docs, rt):
    model, tok = build_tiny("tiny-llama")
    ts = tokenize(docs, tok, "clm", max_length=32)
    train(model, ts, _cfg(max_steps=4, **{"log.every_steps": 2}), rt, eval_data=ts, out_dir=tmp_path)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert {"step", "loss", "lr", "tokens_per_s", "tokens_seen"} <= set(r) and r["tokens_per_s"] > 0
    assert "eval_loss" in recs[-1] and "eval_perplexity" in recs[-1]
    result = json.loads((tmp_path / "train_result.json").read_text())
    assert result["steps"] == 4
    pytest.importorskip("tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_kv_cache_off_while_training_and_restored(rt, docs):
    model, tok = build_tiny("tiny-llama")
    caches = []
    forward = model.forward
    model.forward = lambda *a, **k: caches.append(forward(*a, **k)) or caches[-1]
    train(model, tokenize(docs, tok, "clm", max_length=32), _cfg(max_steps=2), rt)
    assert [c.past_key_values for c in caches] == [None, None]
    assert model.config.use_cache is True
