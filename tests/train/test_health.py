"""Divergence / collapse detection, healthy-only checkpoints, resume with explicit changes, non-tty progress."""

import io
import logging
import math
import re
import shutil

import pytest
import torch
from rich.console import Console

from lmslim.assets.tiny import build_tiny
from lmslim.core.errors import UserError
from lmslim.train import checkpoint as ckpt
from lmslim.train import loop as loop_mod
from lmslim.train.checkpoint import check_resume_changes
from lmslim.train.config import HealthConfig, TrainConfig
from lmslim.train.data import tokenize
from lmslim.train.health import HealthMonitor
from lmslim.train.loop import TrainingDiverged, train
from lmslim.train.optim import lr_factor


def _cfg(**over):
    base = {"max_steps": 8, "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
            "batch": {"batch_size": 2, "max_length": 32}, "log": {"every_steps": 1}}
    return TrainConfig.from_dict(base, [f"{k}={v}" for k, v in over.items()])


def _data(docs, model_name="tiny-llama"):
    model, tok = build_tiny(model_name)  # the same seeded weights every call
    return model, tokenize(docs, tok, "clm", max_length=32)


def _kept(out):
    return [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]


def _largest(folder):
    from safetensors.torch import load_file

    return max(float(t.abs().max()) for t in load_file(str(folder / "model.safetensors")).values())


# ------------------------------------------------------------------------------------------ divergence

def test_adamw_huge_lr_stops_and_keeps_no_unhealthy_checkpoint(tmp_path, docs, rt):
    """AdamW at lr=1e3: the loss jumps at step 2, then the model would freeze (zero gradients) and save."""
    model, ts = _data(docs)
    cfg = _cfg(max_steps=30, **{"optim.lr": 1e3, "schedule.warmup_steps": 0, "checkpoint.every_steps": 1})
    with pytest.raises(TrainingDiverged, match=r"at step 2: the loss jumped to .* health.loss_factor=10 .*no good "
                                               r"checkpoint was written; removed step-0000001") as e:
        train(model, ts, cfg, rt, out_dir=tmp_path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    # Step 1's checkpoint held the weights that gave the jump (|w| ~ 1e3): removed; no final model either.
    assert _kept(tmp_path) == [] and not (tmp_path / "model.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adamw_huge_lr_cli_exits_2_with_one_error_line(tmp_path, docs, capsys):
    from lmslim.cli.main import main

    data = tmp_path / "text.txt"
    data.write_text("\n".join(docs.documents))
    out = tmp_path / "run"
    code = main(["train", "builtin:tiny-llama", "--data", str(data), "--out", str(out), "--max-steps", "30",
                 "optim.lr=1e3", "schedule.warmup_steps=0", "checkpoint.every_steps=1", "batch.max_length=32",
                 "batch.batch_size=2"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0] == err[-1] and "training diverged at step 2" in errors[0]
    assert not (out / "model.safetensors").exists() and _kept(out) == []


def test_sgd_huge_lr_never_saves_absurd_weights(tmp_path, docs, rt):
    """SGD at lr=1e20 (clipped gradient): step 1's update gives weights ~1e19, step 2 a NaN loss."""
    model, ts = _data(docs)
    cfg = _cfg(**{"optim.name": "sgd", "optim.lr": 1e20, "schedule.name": "constant", "checkpoint.every_steps": 1})
    with pytest.raises(TrainingDiverged, match=r"at step 1: parameter \S+ reached \S+e\+1[89] \(limit 1e\+04, "
                                               r"health.max_weight\); nothing was saved at this step; no good "
                                               r"checkpoint"):
        train(model, ts, cfg, rt, out_dir=tmp_path)
    assert _kept(tmp_path) == [] and not (tmp_path / "model.safetensors").exists()


def test_sgd_lr_raised_on_resume_keeps_only_sane_checkpoints(tmp_path, docs, rt):
    """Two healthy steps, then a resume at lr=1e20: the kept checkpoints hold finite, sane weights."""
    base = {"optim.name": "sgd", "optim.lr": 0.1, "schedule.name": "constant", "checkpoint.every_steps": 1}
    model, ts = _data(docs)
    train(model, ts, _cfg(max_steps=2, **base), rt, out_dir=tmp_path, save_final=False)
    assert _kept(tmp_path) == ["step-0000001", "step-0000002"]
    model, ts = _data(docs)
    with pytest.raises(TrainingDiverged, match=r"at step 3: parameter .* reached .*last good checkpoint is "
                                               r"\S+step-0000002 \(step 2\)"):
        train(model, ts, _cfg(max_steps=6, **{**base, "optim.lr": 1e20}), rt, out_dir=tmp_path, resume=True,
              resume_changes=["optim.lr"])
    kept = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-0000001", "step-0000002"]
    assert all(math.isfinite(_largest(f)) and _largest(f) < 10 for f in kept)
    assert not (tmp_path / "model.safetensors").exists()


def test_zero_gradient_collapse_is_detected(tmp_path, docs, rt):
    """With the jump checks off, the frozen model (exactly zero gradients from step 3 on) is still caught."""
    model, ts = _data(docs)
    cfg = _cfg(max_steps=30, **{"optim.lr": 1e3, "schedule.warmup_steps": 0, "checkpoint.every_steps": 1,
                                "health.loss_factor": 0, "health.grad_factor": 0, "health.zero_grad_steps": 5})
    grads = []
    with pytest.raises(TrainingDiverged, match=r"at step 7: the gradient norm has been 0 for 5 steps in a row.*"
                                               r"last good checkpoint is \S+step-0000001 .*removed step-0000002"):
        train(model, ts, cfg, rt, out_dir=tmp_path, callbacks=[lambda s, rec: grads.append(rec["grad_norm"])])
    assert grads[2:] == [0.0] * 4  # steps 3-6 had zero gradients (step 7 stopped before its update)
    assert _kept(tmp_path) == ["step-0000001"]  # nothing written during the streak
    assert not (tmp_path / "model.safetensors").exists()


def test_healthy_run_is_bit_identical_with_checks(tmp_path, docs, rt):
    """Checks only read numbers: losses and weights equal those of a run without them (GPT-2: dropout RNG)."""
    runs = []
    for enabled in (True, False):
        model, ts = _data(docs, "tiny-gpt2")
        cfg = _cfg(**{"batch.grad_accum": 2, "checkpoint.every_steps": 2, "eval.every_steps": 4,
                      "health.enabled": enabled})
        r = train(model, ts, cfg, rt, eval_data=ts, out_dir=tmp_path / str(enabled))
        runs.append((r.losses, model.state_dict()))
    (la, wa), (lb, wb) = runs
    assert la == lb and len(la) == 8
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _kept(tmp_path / "True") == _kept(tmp_path / "False") == ["step-0000006", "step-0000008"]


def test_monitor_tolerates_wobbles_and_skipped_fp16_steps():
    w = torch.nn.Parameter(torch.ones(2))
    h = HealthMonitor(HealthConfig(), [("w", w)])
    for step, (loss, grad) in enumerate([(2.0, 1.0), (0.1, 0.1), (0.05, 0.05), (0.03, 0.02)], start=1):
        h.check_step(step, loss, grad)
    h.check_step(5, 1.0, 0.9)  # 30x its average, but below where the run started: a hard batch, not divergence
    h.check_step(6, 0.05, float("inf"), scaled=True)  # fp16: the GradScaler skips the step
    with pytest.raises(TrainingDiverged, match="gradient norm became inf"):
        h.check_step(7, 0.05, float("inf"))
    off = HealthMonitor(HealthConfig(enabled=False), [("w", w)])
    off.check_step(1, 1.0, 1.0)
    off.check_step(2, 1e9, 0.0)
    with pytest.raises(TrainingDiverged, match="loss became nan"):  # non-finite loss stops even when off
        off.check_step(3, float("nan"), 1.0)


@pytest.mark.parametrize("override,message", [
    ("health.loss_factor=0.5", "health.loss_factor must be > 1"),
    ("health.zero_grad_steps=-1", "health.zero_grad_steps must be >= 0"),
    ("health.max_weight=-1", "health.max_weight must be >= 0"),
    ("health.enable=false", "did you mean 'health.enabled'"),
    ("log.progress_every_s=-1", "log.progress_every_s must be >= 0"),
])
def test_health_config_validated(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        TrainConfig.from_dict({}, [override])


# ------------------------------------------------------------------------------------------ resume changes

def test_resume_with_changed_lr_needs_explicit_permission_and_applies_it(tmp_path, docs, rt, monkeypatch):
    optimizers = []
    build = loop_mod.build_optimizer
    monkeypatch.setattr(loop_mod, "build_optimizer", lambda *a, **k: optimizers.append(build(*a, **k)) or
                        optimizers[-1])
    base = {"optim.lr": 1e-3, "schedule.warmup_steps": 0, "checkpoint.every_steps": 1, "max_steps": 6}

    def run(resume=False, changes=(), **over):
        model, ts = _data(docs)
        seen = []  # (step, lr the step used, lr the optimizer's group holds for the next step)

        def cb(step, rec):
            seen.append((step, rec["lr"], optimizers[-1].param_groups[0]["lr"]))
            return not resume and step == 3

        train(model, ts, _cfg(**{**base, **over}), rt, out_dir=tmp_path, resume=resume, resume_changes=changes,
              callbacks=[cb], save_final=False)
        return seen

    run()  # cosine over 6 steps at lr 1e-3, stopped after step 3
    with pytest.raises(UserError, match=r"different training config \(optim.lr\).*--resume-changes optim.lr"):
        run(resume=True, **{"optim.lr": 5e-3})
    with pytest.raises(UserError, match="optim.name cannot change on resume"):
        run(resume=True, changes=["optim.name"], **{"optim.name": "sgd"})
    with pytest.raises(UserError, match="unknown config key 'optim.learning_rate'"):
        run(resume=True, changes=["optim.learning_rate"])
    model, ts = _data(docs)
    with pytest.raises(UserError, match="only apply when resuming"):
        train(model, ts, _cfg(**base), rt, resume_changes=["optim.lr"])
    seen = run(resume=True, changes=["optim.lr"], **{"optim.lr": 5e-3})
    sched = _cfg(**base).schedule
    # The step after the checkpoint uses the new peak lr on the same (cosine, 6-step) schedule...
    assert [s for s, _, _ in seen] == [4, 5, 6]
    for s, used, next_lr in seen:
        assert used == pytest.approx(5e-3 * lr_factor(s - 1, sched, 6), rel=1e-12)
        assert next_lr == pytest.approx(5e-3 * lr_factor(s, sched, 6), rel=1e-12)  # the optimizer's group
    opt = optimizers[-1]
    assert all(g["initial_lr"] == 5e-3 for g in opt.param_groups)
    # ...and a changed schedule section applies as a whole: constant from here on.
    shutil.rmtree(tmp_path)
    run()
    seen = run(resume=True, changes=["optim.lr", "schedule"], **{"optim.lr": 2e-3, "schedule.name": "constant"})
    assert {used for _, used, _ in seen} == {2e-3} and optimizers[-1].param_groups[0]["lr"] == 2e-3


def test_resumed_update_really_uses_the_new_lr(tmp_path, docs, rt):
    """Plain SGD: the first resumed update at lr B is exactly B/A times the one at lr A (same gradient)."""
    base = {"optim.name": "sgd", "optim.lr": 0.1, "schedule.name": "constant", "optim.grad_clip": 0,
            "checkpoint.every_steps": 1}
    model, ts = _data(docs)
    train(model, ts, _cfg(max_steps=2, **base), rt, out_dir=tmp_path / "a", save_final=False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    deltas = []
    for folder, lr in (("a", 0.1), ("b", 0.4)):
        model, ts = _data(docs)
        train(model, ts, _cfg(max_steps=3, **{**base, "optim.lr": lr}), rt, out_dir=tmp_path / folder, resume=True,
              resume_changes=["optim.lr"] if lr != 0.1 else [], save_final=False)
        deltas.append({k: v - start[k] for k, v in model.state_dict().items()})
    key = "model.layers.0.mlp.up_proj.weight"
    assert deltas[0][key].abs().max() > 0
    assert torch.allclose(deltas[1][key], 4 * deltas[0][key], rtol=1e-4, atol=1e-7)


def test_check_resume_changes():
    assert check_resume_changes("optim.lr, schedule") == ("optim.lr", "schedule")
    assert check_resume_changes(["optim", "optim"]) == ("optim",)  # a section: every key but optim.name
    with pytest.raises(UserError, match="did you mean 'schedule.warmup_steps'"):
        check_resume_changes(["schedule.warmup"])


# ------------------------------------------------------------------------------------------ progress

def _no_terminal(monkeypatch):
    import lmslim.train.metrics as metrics

    monkeypatch.setattr(metrics, "console", lambda: Console(file=io.StringIO(), force_terminal=False))


LINE = re.compile(r"^train 1/4 \(25%\) loss \d+\.\d{4} lr \S+ \d+ tok/s \| [\d.]+ (steps/s|s/step) \| "
                  r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")


def test_progress_lines_on_a_non_terminal(docs, rt, capsys, monkeypatch):
    _no_terminal(monkeypatch)
    model, ts = _data(docs)
    train(model, ts, _cfg(max_steps=4, **{"log.every_steps": 2}), rt)  # step 1 writes no metrics record
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train ")]
    assert LINE.match(lines[0]), lines  # the first step, with tokens/s, rate and ETA
    assert re.match(r"^train 4/4 \(100%\) .* \| done$", lines[-1]), lines
    assert len(lines) <= 4  # 30 s apart otherwise: a short run shows its first step and its end


def test_progress_goes_to_logging_when_it_shows_info(docs, rt, capsys, caplog, monkeypatch):
    _no_terminal(monkeypatch)
    model, ts = _data(docs)
    with caplog.at_level(logging.INFO, logger="lmslim"):
        train(model, ts, _cfg(max_steps=4), rt)
    assert not [x for x in capsys.readouterr().err.splitlines() if x.startswith("train ")]  # not twice
    lines = [r.getMessage() for r in caplog.records if r.name == "lmslim.train.metrics"]
    assert LINE.match(lines[0]) and lines[-1].endswith("| done"), lines


def test_distill_resume_changes_reach_the_loop(tmp_path, docs):
    from lmslim.compress.distill import DistillConfig
    from lmslim.compress.distill.run import run_distill

    data = tmp_path / "text.txt"
    data.write_text("\n".join(docs.documents))
    out = tmp_path / "student"

    def run(lr, steps=2, **kw):
        cfg = TrainConfig.from_dict({"max_steps": steps, "optim": {"lr": lr}, "checkpoint": {"every_steps": 1},
                                     "batch": {"batch_size": 2, "max_length": 32}})
        return run_distill(teacher="builtin:tiny-llama", student_layers="2", data=str(data), out_dir=out,
                           distill_config=DistillConfig(), train_config=cfg, device="cpu", **kw)

    with pytest.raises(UserError, match="only applies with --resume"):
        run(1e-3, resume_changes=["optim.lr"])
    run(1e-3)
    with pytest.raises(UserError, match=r"different training config \(optim.lr\)"):
        run(2e-3, resume=True)
    summary = run(2e-3, steps=3, resume=True, resume_changes=["optim.lr"])
    assert summary["train"]["steps"] == 3 and summary["train"]["config"]["optim"]["lr"] == 2e-3
