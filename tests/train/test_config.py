from pathlib import Path

import pytest

from lmslim.core.errors import UserError
from lmslim.train.config import TrainConfig, all_keys

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides():
    cfg = TrainConfig.from_dict({"optim": {"lr": 1e-3}}, ["optim.betas=[0.9, 0.95]", "batch.grad_accum=4",
                                                         "precision.activation_checkpointing=true", "optim.eps=1e-6"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.95) and cfg.batch.grad_accum == 4
    assert cfg.precision.activation_checkpointing is True and cfg.optim.eps == 1e-6
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize("overrides,message", [
    (["batch.grad_acum=2"], "did you mean 'batch.grad_accum'"),
    (["learning_rate=1e-3"], "did you mean 'optim.lr'"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["optim.name=lion"], "optim.name must be one of"),
    (["batch.batch_size=two"], "must be an integer"),
    (["batch.batch_size=0"], "batch.batch_size must be >= 1"),
    (["precision.mode=fp8"], "precision.mode must be one of"),
    (["optim.nesterov=true"], "nesterov needs"),
    (["batch.token_budget=16", "batch.max_length=64"], "must be >= batch.max_length"),
    (["optim"], "must look like key=value"),
    (["optim=3"], "must be a mapping"),
    (["schedule.name=cosine", "schedule.name.x=1"], "is a value, not a section"),
])
def test_bad_values(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TrainConfig.from_dict({}, overrides)


def test_yaml(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("max_steps: 7\noptim:\n  lr: 1.0e-4\n")
    assert TrainConfig.from_yaml(p, ["max_steps=9"]).max_steps == 9
    p.write_text("- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        TrainConfig.from_yaml(p)
    with pytest.raises(UserError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.to_dict()["optim"]["lr"] > 0


def test_changed_keys_and_all_keys():
    a, b = TrainConfig(), TrainConfig.from_dict({}, ["optim.lr=1", "max_steps=5"])
    assert a.changed_keys(b) == ["max_steps", "optim.lr"]
    assert "early_stop.patience" in all_keys()
