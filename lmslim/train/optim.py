"""Optimizers, parameter groups and learning-rate schedules.

Weight decay is never applied to biases and normalisation weights (decaying them only pulls
activations toward zero, see Loshchilov & Hutter, https://arxiv.org/abs/1711.05101), and to
embeddings only when ``decay_embeddings`` is true.

Example:
    >>> import torch
    >>> from lmslim.train.config import OptimConfig, ScheduleConfig
    >>> from lmslim.train.optim import build_optimizer, build_scheduler
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> opt = build_optimizer(list(model.named_parameters()), OptimConfig(lr=1e-3, weight_decay=0.1), [model])
    >>> [(g["group"], len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [('decay', 1, 0.1), ('no_decay', 3, 0.0)]
    >>> sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=2), total_steps=10)
    >>> round(opt.param_groups[0]["lr"], 6)  # step 0 of a 2-step warmup
    0.0005
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmslim.train.config import FUSED_OPTIMIZERS, OptimConfig, ScheduleConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def no_decay_ids(modules: list[nn.Module], decay_embeddings: bool) -> set[int]:
    """ids of parameters that must not get weight decay: biases, norm weights, (embeddings)."""
    ids: set[int] = set()
    for module in modules:
        for m in module.modules():
            # HF norms (LlamaRMSNorm, ...) are their own classes; their names end in "Norm".
            is_norm = isinstance(m, _NORM_TYPES) or type(m).__name__.endswith("Norm")
            is_emb = isinstance(m, nn.Embedding)
            for _, p in m.named_parameters(recurse=False):
                if is_norm or (is_emb and not decay_embeddings) or p.ndim < 2:
                    ids.add(id(p))
    return ids


def fused_supported(cfg: OptimConfig, params: list[torch.Tensor]) -> bool:
    """Whether torch's fused step can run ``cfg.name`` over ``params`` (plain floating tensors on one device type).

    FSDP2's sharded parameters (DTensor) are left to the per-tensor loop.
    """
    if cfg.name not in FUSED_OPTIMIZERS or not params:
        return False
    if any(type(p) is not nn.Parameter and type(p) is not torch.Tensor for p in params):
        return False  # DTensor and other tensor subclasses
    kinds = {p.device.type for p in params}
    if len(kinds) != 1 or not kinds <= {"cpu", "cuda"}:
        return False
    if cfg.name == "adagrad" and kinds != {"cpu"}:
        return False  # torch's fused Adagrad is CPU-only
    return all(p.is_floating_point() for p in params)


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig,
                    modules: list[nn.Module]) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters, in a decay and a no-decay group.

    Args:
        named_params: (name, parameter) pairs; frozen ones (``requires_grad=False``) and repeats
            (tied weights) are skipped.
        modules: the modules the parameters live in, to find norms and embeddings by type.

    With ``cfg.fused`` ``auto`` the fused single-kernel step is used where :func:`fused_supported` says
    torch has it (4-5x faster than the per-tensor loop on a CPU); ``true`` insists on it.
    """
    skip = no_decay_ids(modules, cfg.decay_embeddings) | {id(p) for _, p in named_params if p.ndim < 2}
    seen: set[int] = set()
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in skip else decay).append(p)
    if not decay and not no_decay:
        from lmslim.core.errors import UserError

        raise UserError("nothing to train: every parameter is frozen (requires_grad=False)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "group": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    fused = cfg.fused != "false" and fused_supported(cfg, decay + no_decay)
    if cfg.fused == "true" and not fused:
        from lmslim.core.errors import UserError

        raise UserError(f"optim.fused=true: torch has no fused {cfg.name} step for these parameters (sharded, "
                        "mixed devices or a device without one); use optim.fused=auto")
    extra = {"fused": True} if fused else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, **extra)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, eps=cfg.eps, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **extra)


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for 0-based optimizer step ``step``.

    Warmup is linear and reaches the peak at step ``warmup_steps - 1``; afterwards the factor decays
    from 1 toward ``min_lr_ratio`` (reached after the last step; linear or half a cosine), or stays 1.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)  # the final step still learns (factor just above min)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 1.0 - progress if cfg.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`lr_factor` (its state dict holds only numbers, so it checkpoints safely)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
