"""Training configuration: frozen, validated dataclasses, loadable from YAML with dotted overrides.

Every value is checked in ``__post_init__`` and a bad one raises :class:`UserError` with the fix.
Unknown keys are rejected with a "did you mean" hint, so a typo never silently falls back to a
default.

Example:
    >>> from lmslim.train.config import TrainConfig
    >>> cfg = TrainConfig.from_dict({"max_steps": 20, "optim": {"lr": 1e-3}}, overrides=["batch.grad_accum=2"])
    >>> cfg.optim.lr, cfg.batch.grad_accum
    (0.001, 2)
    >>> TrainConfig.from_dict({"optim": {"learning_rate": 1e-3}})
    Traceback (most recent call last):
    ...
    lmslim.core.errors.UserError: unknown config key 'optim.learning_rate' (did you mean 'optim.lr'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError
from lmslim.train.config_values import coerce, copy_mapping, flatten, parse_scalar, set_dotted, to_plain

OPTIMIZERS = ("adamw", "adam", "adagrad", "rmsprop", "sgd")
FUSED_OPTIMIZERS = ("adamw", "adam", "adagrad", "sgd")  # torch has a fused step for these
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and gradient clipping."""

    name: str = "adamw"
    """adamw | adam | adagrad | rmsprop | sgd"""
    lr: float = 5e-5
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.0
    """Decoupled for adamw, L2 for the others. Never applied to norms and biases."""
    decay_embeddings: bool = True
    """Whether token/position embeddings get weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    """sgd and rmsprop."""
    nesterov: bool = False
    """sgd only; needs momentum > 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    fused: bool | str = "auto"
    """auto | true | false: torch's fused (single-kernel) step for adamw, adam, sgd and adagrad. auto uses it
    where torch has it for the parameters (not for FSDP-sharded ones); on this CPU it is 4-5x faster than the
    per-tensor loop (benchmarks/train_bench.py). The update is the same up to float rounding."""

    def __post_init__(self) -> None:
        _choice(self.name, OPTIMIZERS, "optim.name")
        _choice(str(self.fused).lower(), ("auto", "true", "false"), "optim.fused")
        object.__setattr__(self, "fused", str(self.fused).lower())  # True / "true" -> "true"
        _need(self.fused != "true" or self.name in FUSED_OPTIMIZERS,
              f"optim.fused=true needs optim.name in {', '.join(FUSED_OPTIMIZERS)} (torch has no fused {self.name})")
        _need(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _need(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _need(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _need(self.momentum >= 0, f"optim.momentum must be >= 0, got {self.momentum}")
        _need(not self.nesterov or (self.name == "sgd" and self.momentum > 0),
              "optim.nesterov needs optim.name=sgd and optim.momentum > 0")
        _need(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup from 0, then constant / linear / cosine decay to ``min_lr_ratio * lr``."""

    name: str = "cosine"
    """constant | linear | cosine"""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _choice(self.name, SCHEDULES, "schedule.name")
        _need(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class PrecisionConfig:
    """Autocast precision and activation checkpointing. Weights and optimizer state stay fp32."""

    mode: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16 (with dynamic loss scaling)"""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward: less memory, ~30% more compute."""

    def __post_init__(self) -> None:
        _choice(self.mode, PRECISIONS, "precision.mode")


@dataclass(frozen=True)
class BatchConfig:
    """How examples become micro-batches."""

    batch_size: int = 8
    """Examples per micro-batch (used when token_budget is 0)."""
    token_budget: int = 0
    """Max padded tokens per micro-batch (rows x longest row); 0 = fixed batch_size."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 512
    """Longest sequence: clm documents are cut into pieces of this many tokens, others truncated."""
    padding: str = "dynamic"
    """dynamic (pad to the longest row of the batch) | max_length (every row padded to max_length)"""
    bucketing: bool = True
    """Group examples of similar length into the same batch (less padding)."""
    pack: bool = True
    """clm: pack short documents together into rows of up to max_length tokens."""
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = 0
    """Background processes that collate batches (0 = in the training process). The batch plan is fixed
    before the workers see it, so the batches and their order do not depend on this value."""

    def __post_init__(self) -> None:
        _need(self.num_workers >= 0, f"batch.num_workers must be >= 0, got {self.num_workers}")
        _need(self.batch_size >= 1, f"batch.batch_size must be >= 1, got {self.batch_size}")
        _need(self.token_budget >= 0, f"batch.token_budget must be >= 0 (0 = off), got {self.token_budget}")
        _need(self.grad_accum >= 1, f"batch.grad_accum must be >= 1, got {self.grad_accum}")
        _need(self.max_length >= 2, f"batch.max_length must be >= 2, got {self.max_length}")
        _need(self.token_budget == 0 or self.token_budget >= self.max_length,
              f"batch.token_budget ({self.token_budget}) must be >= batch.max_length ({self.max_length}) "
              "so that the longest example fits")
        _choice(self.padding, ("dynamic", "max_length"), "batch.padding")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0 = only at evaluations and at the end)."""
    keep_last: int = 2
    """How many periodic checkpoints to keep (the best one is kept separately)."""
    keep_best: bool = True
    """With evaluation: keep DIR/checkpoints/best (model weights of the best evaluation)."""

    def __post_init__(self) -> None:
        _need(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _need(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate every N optimizer steps (0 = only at the end); needs eval data."""
    max_batches: int = 0
    """Cap on evaluation batches for the loss (0 = all)."""

    def __post_init__(self) -> None:
        _need(self.every_steps >= 0, f"eval.every_steps must be >= 0, got {self.every_steps}")
        _need(self.max_batches >= 0, f"eval.max_batches must be >= 0, got {self.max_batches}")


@dataclass(frozen=True)
class EarlyStopConfig:
    metric: str = "eval_loss"
    """Metric that decides the best checkpoint and early stopping (eval_loss, accuracy, macro_f1, f1, ...)."""
    mode: str = "auto"
    """min | max | auto (min for names with loss/perplexity, else max)"""
    patience: int = 0
    """Stop after this many evaluations without improvement (0 = never stop early)."""
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _choice(self.mode, ("auto", "min", "max"), "early_stop.mode")
        _need(self.patience >= 0, f"early_stop.patience must be >= 0, got {self.patience}")
        _need(self.min_delta >= 0, f"early_stop.min_delta must be >= 0, got {self.min_delta}")

    @property
    def minimize(self) -> bool:
        if self.mode != "auto":
            return self.mode == "min"
        return any(w in self.metric for w in ("loss", "perplexity", "ppl"))


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10
    """Write a metrics.jsonl line (and TensorBoard scalars) every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard events to DIR/tensorboard when the tensorboard package is installed."""
    progress: bool = True
    """Progress on stderr: a bar on a terminal; otherwise (CI, a log file, nohup) one line with step, loss,
    tokens/s and ETA at the first step, every ``progress_every_s`` seconds and at the end."""
    progress_every_s: float = 30.0
    """Seconds between two progress lines when stderr is not a terminal."""

    def __post_init__(self) -> None:
        _need(self.every_steps >= 1, f"log.every_steps must be >= 1, got {self.every_steps}")
        _need(self.progress_every_s >= 0, f"log.progress_every_s must be >= 0, got {self.progress_every_s}")


@dataclass(frozen=True)
class HealthConfig:
    """Divergence and collapse detection (``lmslim/train/health.py``).

    A run that blows up rarely crashes by itself: its loss freezes, its gradients vanish, and a broken
    model would be saved with a success exit. These checks stop it with ``TrainingDiverged`` instead,
    before the bad update is applied, and keep only checkpoints written while training was healthy.
    A non-finite loss always stops training, even with ``enabled: false``.
    """

    enabled: bool = True
    loss_factor: float = 10.0
    """Stop when a step's loss is above this many times its running average (an EMA over ~10 steps) and
    above the run's first loss; 0 = off. Applies to positive losses, from the second step on."""
    grad_factor: float = 1000.0
    """The same for the gradient norm (measured before clipping); 0 = off."""
    zero_grad_steps: int = 10
    """Stop after this many consecutive steps with a zero gradient norm: a collapsed model no longer learns;
    0 = off. No checkpoint is written while such a streak lasts."""
    max_weight: float = 1e4
    """A checkpoint, the best and the final model are written only when every trainable parameter is finite
    and no larger in magnitude than this (or than 10x the largest one at the start of the run, if that is
    larger); 0 = check finiteness only."""

    def __post_init__(self) -> None:
        for key in ("loss_factor", "grad_factor"):
            value = getattr(self, key)
            _need(value == 0 or value > 1, f"health.{key} must be > 1 (or 0 = off), got {value}")
        _need(self.zero_grad_steps >= 0, f"health.zero_grad_steps must be >= 0 (0 = off), got {self.zero_grad_steps}")
        _need(self.max_weight >= 0, f"health.max_weight must be >= 0 (0 = finiteness only), got {self.max_weight}")


COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")
PP_SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a ``torchrun`` / ``--nproc`` job train together (ignored in one process)."""

    strategy: str = "ddp"
    """ddp (every rank holds the whole model, gradients all-reduced) | fsdp (FSDP2 ``fully_shard``: parameters,
    gradients and optimizer state sharded across ranks, per decoder layer)"""
    comm_hook: str = "none"
    """ddp only: gradient compression before the all-reduce: none | fp16 | bf16 | powersgd"""
    powersgd_rank: int = 1
    """powersgd: rank r of the low-rank approximation (an n x m gradient is sent as (n + m) x r numbers)."""
    powersgd_start_step: int = 10
    """powersgd: plain all-reduce for the first N steps (PowerSGD's warm-up; must be >= 2)."""
    bucket_mb: float = 25.0
    """ddp: gradient bucket size in MB (all-reduce overlaps backward one bucket at a time)."""
    find_unused_parameters: bool = False
    """ddp: allow parameters that get no gradient in some steps (slower; needed e.g. for an unused pooler)."""
    timeout_s: int = 600
    """A collective that waits longer than this fails instead of hanging (e.g. when a rank died)."""
    tp: int = 1
    """Tensor-parallel degree: every decoder layer's attention heads and MLP columns, and the vocabulary of the
    embedding / LM head, are split over this many ranks (Llama-style models). The data-parallel degree is
    world size / (tp x pp)."""
    pp: int = 1
    """Pipeline-parallel degree: consecutive decoder layers on this many ranks (stages), micro-batched."""
    pp_schedule: str = "1f1b"
    """pp: gpipe (all forwards, then all backwards) | 1f1b (one forward, one backward: less activation memory)"""
    pp_microbatches: int = 2
    """pp: micro-batches each batch is cut into (batch.batch_size must be a multiple)."""

    def __post_init__(self) -> None:
        _choice(self.strategy, ("ddp", "fsdp"), "distributed.strategy")
        _choice(self.comm_hook, COMM_HOOKS, "distributed.comm_hook")
        _choice(self.pp_schedule, PP_SCHEDULES, "distributed.pp_schedule")
        _need(self.tp >= 1, f"distributed.tp must be >= 1, got {self.tp}")
        _need(self.pp >= 1, f"distributed.pp must be >= 1, got {self.pp}")
        _need(self.pp_microbatches >= 1, f"distributed.pp_microbatches must be >= 1, got {self.pp_microbatches}")
        _need(self.comm_hook == "none" or self.tp * self.pp == 1,
              "distributed.comm_hook compresses DDP's gradient all-reduce; it cannot be combined with distributed.tp "
              "or distributed.pp (set distributed.comm_hook=none)")
        _need(self.comm_hook == "none" or self.strategy == "ddp",
              "distributed.comm_hook needs distributed.strategy=ddp (FSDP reduce-scatters its own shards)")
        _need(self.powersgd_rank >= 1, f"distributed.powersgd_rank must be >= 1, got {self.powersgd_rank}")
        _need(self.powersgd_start_step >= 2,
              f"distributed.powersgd_start_step must be >= 2, got {self.powersgd_start_step}")
        _need(self.bucket_mb > 0, f"distributed.bucket_mb must be > 0, got {self.bucket_mb}")
        _need(self.timeout_s >= 1, f"distributed.timeout_s must be >= 1, got {self.timeout_s}")

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model together (tp x pp)."""
        return self.tp * self.pp

    def data_parallel(self, world_size: int) -> int:
        """The data-parallel degree for ``world_size`` processes; refuses a plan that does not fit.

        Raises:
            UserError: tp x pp does not divide the world size, or a combination that is not supported.

        Example:
            >>> DistributedConfig(tp=2, strategy="fsdp").data_parallel(4)
            2
        """
        mp = self.model_parallel
        if mp == 1:
            return world_size
        _need(world_size % mp == 0, f"distributed.tp={self.tp} x distributed.pp={self.pp} = {mp} does not divide "
              f"the {world_size} process(es); use --nproc {mp} (or a multiple of it)")
        dp = world_size // mp
        _need(self.pp == 1 or dp == 1 or self.strategy == "ddp",
              f"distributed.pp={self.pp} with {dp} data-parallel copies replicates each stage and all-reduces its "
              "gradients (as DDP); set distributed.strategy=ddp")
        _need(dp == 1 or self.tp == 1 or self.pp > 1 or self.strategy == "fsdp",
              f"{dp} data-parallel copies x distributed.tp={self.tp} needs distributed.strategy=fsdp (FSDP2 shards "
              "the tensor-parallel parameters over the data-parallel ranks; DDP does not take them)")
        return dp


# Sections a resumed run may change: they do not alter the optimisation trajectory up to the checkpoint.
RESUMABLE_CHANGES = ("max_steps", "epochs", "log", "checkpoint", "eval", "early_stop", "batch.num_workers",
                     "distributed.timeout_s", "host_memory", "health")
# Keys a resume cannot change even when asked: the checkpoint's state is stored for the old value.
NOT_RESUMABLE = {"optim.name": "the checkpoint holds the optimizer state of another optimizer",
                 "distributed.strategy": "the checkpoint's weights and optimizer state are stored for the old "
                                         "strategy (sharded or not)",
                 "distributed.tp": "the checkpoint's shards are laid out for the old tensor-parallel plan",
                 "distributed.pp": "the checkpoint's shards are laid out for the old pipeline plan"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides model, data and runtime."""

    max_steps: int = 0
    """Optimizer steps to run; 0 = derive from epochs."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is 0."""
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    host_memory: str = "reuse"
    """reuse | release: what the C allocator does with large freed host buffers while training. Every step
    frees and re-allocates the same large activation and gradient buffers (the logits alone are batch x
    length x vocabulary floats); glibc returns them to the OS and each new step pays page faults to get
    them back. ``reuse`` keeps them in the process heap (glibc's mmap and trim thresholds raised): measured
    +40-50% tokens/s on a small Llama on a 2-core CPU, for a higher resident set (benchmarks/train_bench.py).
    The setting is process-wide and stays after training. ``release`` leaves the allocator as it is."""

    def __post_init__(self) -> None:
        _need(self.max_steps >= 0, f"max_steps must be >= 0 (0 = use epochs), got {self.max_steps}")
        _choice(self.host_memory, ("reuse", "release"), "host_memory")
        _need(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")

    # ------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        """Build from a nested dict plus ``key=value`` dotted overrides (values parsed as YAML scalars)."""
        data = copy_mapping(data or {})
        if not isinstance(data, dict):
            raise UserError("a training config must be a mapping of keys to values")
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
            set_dotted(data, key.strip(), parse_scalar(raw, key.strip()))
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        """Load a YAML file (or only defaults when ``path`` is None) and apply overrides."""
        from lmslim.core.safeyaml import load_yaml_file

        data: dict[str, Any] = {}
        if path is not None:
            data = load_yaml_file(path, f"config file {path}") or {}
            if not isinstance(data, dict):
                raise UserError(f"{path} must hold a mapping (key: value), not a {type(data).__name__}")
        return cls.from_dict(data, overrides)

    def changed_keys(self, other: "TrainConfig") -> list[str]:
        """Dotted keys whose values differ between two configs."""
        return sorted(k for k, v in flatten(self.to_dict()).items() if flatten(other.to_dict()).get(k) != v)


# ---------------------------------------------------------------------------------------------- helpers

def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts (for hints and docs)."""
    keys = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(all_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


# Names other trainers use for the same setting.
_SYNONYMS = {"learning_rate": "optim.lr", "gradient_accumulation_steps": "batch.grad_accum",
             "max_grad_norm": "optim.grad_clip", "warmup": "schedule.warmup_steps", "lr_scheduler": "schedule.name",
             "per_device_train_batch_size": "batch.batch_size", "gradient_checkpointing":
             "precision.activation_checkpointing", "num_train_epochs": "epochs", "bf16": "precision.mode",
             "fp16": "precision.mode", "optimizer": "optim.name"}


def _hint(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _SYNONYMS:
        return f" (did you mean {_SYNONYMS[leaf]!r}?)"
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:
        # A typo in the leaf under a wrong section ("batch.lr") still deserves a hint.
        close = [k for k in all_keys() if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.6)]
        close = close[:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINT_CACHE:
        _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return _HINT_CACHE[cls]


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section {prefix.rstrip('.')!r} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"unknown config key {prefix + str(key)!r}{_hint(prefix + str(key))}")
    kwargs = {}
    for name, value in data.items():
        t = _hints(cls)[name]
        kwargs[name] = _build(t, value, f"{prefix}{name}.") if dataclasses.is_dataclass(t) else \
            coerce(value, t, prefix + name)
    return cls(**kwargs)



__all__ = ["TrainConfig", "OptimConfig", "ScheduleConfig", "PrecisionConfig", "BatchConfig", "CheckpointConfig",
           "EvalConfig", "EarlyStopConfig", "LogConfig", "HealthConfig", "DistributedConfig", "RESUMABLE_CHANGES",
           "NOT_RESUMABLE", "all_keys"]
