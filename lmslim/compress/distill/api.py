"""Distillation config and the registry entry that recipes and the CLI reach by the name ``distill``.

``DistillConfig`` says which losses to combine and how; ``DistillObjective`` (objective.py) turns it
into ``objective(student, batch) -> (loss, logs)`` for the training loop; :func:`distill` runs the
loop with it.

Example:
    >>> from lmslim.compress.distill import DistillConfig
    >>> DistillConfig(alpha=0.5, temperature=2.0, hidden_weight=1.0, hidden_loss="cosine").temperature
    2.0
    >>> DistillConfig(alpha=1.5)
    Traceback (most recent call last):
    ...
    lmslim.core.errors.UserError: --alpha must be in [0, 1] (weight of the hard-label loss), got 1.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmslim.core.configs import MAX_INT, check_fields, show
from lmslim.core.errors import UserError
from lmslim.core.registry import Registry

DISTILLERS = Registry("distillation")

TASKS = ("clm", "seq-cls", "token-cls", "embed")
KINDS = ("mse", "cosine")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


@dataclass(frozen=True)
class DistillConfig:
    """What the student learns from the teacher.

    Attributes:
        task: ``clm`` (next-token logits), ``seq-cls`` / ``token-cls`` (class logits) or ``embed``
            (mean-pooled sentence embeddings).
        alpha: weight of the hard-label cross-entropy; ``1 − alpha`` weighs the soft-target KL.
        temperature: softmax temperature T of the soft targets (the KL term is scaled by T²).
        hidden_weight: weight of the hidden-state loss (0 = off).
        hidden_loss: ``mse`` or ``cosine`` between (projected) student and teacher hidden states.
        layer_map: ``uniform``, ``last``, ``kept`` or explicit (student, teacher) pairs of
            ``output_hidden_states`` indices (0 = embedding output).
        attention_weight: weight of the attention-map KL (0 = off; needs equal head counts).
        embed_loss: ``cosine`` or ``mse`` on pooled embeddings (task ``embed``).
        projection: learn a linear projection when student and teacher widths differ.
    """

    task: str = "clm"
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    layer_map: Any = "uniform"
    attention_weight: float = 0.0
    embed_loss: str = "cosine"
    projection: bool = True

    def __post_init__(self) -> None:
        from lmslim.compress.distill.losses import parse_layer_map

        check_fields(self)  # types first: the rules below may trust them
        if self.task not in TASKS:
            raise UserError(f"unknown distillation task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"--alpha must be in [0, 1] (weight of the hard-label loss), got {self.alpha}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        for name in ("hidden_weight", "attention_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.hidden_loss not in KINDS:
            raise UserError(f"--hidden-loss must be mse or cosine, got {self.hidden_loss!r}")
        if self.embed_loss not in KINDS:
            raise UserError(f"--embed-loss must be mse or cosine, got {self.embed_loss!r}")
        layer_map = parse_layer_map(self.layer_map) if isinstance(self.layer_map, str) else self.layer_map
        if not isinstance(layer_map, str):
            if not isinstance(layer_map, (list, tuple)) or not layer_map or not all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and _is_index(p[0]) and _is_index(p[1])
                    for p in layer_map):
                raise UserError(f"layer_map must be uniform, last, kept or (student, teacher) pairs of hidden-state "
                                f"indices >= 0 like [[1, 2], [2, 4]], got {show(self.layer_map)}")
            layer_map = tuple((a, b) for a, b in layer_map)
        object.__setattr__(self, "layer_map", layer_map)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        if not isinstance(d["layer_map"], str):
            d["layer_map"] = [list(p) for p in d["layer_map"]]
        return d


@DISTILLERS.register("distill", DistillConfig)
def distill(teacher: Any, student: Any, train_data: Any, config: DistillConfig, train_config: Any,
            runtime: Any, *, cache: Any = None, **train_kwargs: Any) -> Any:
    """Train ``student`` against ``teacher`` with the training engine (:func:`lmslim.train.loop.train`).

    Args:
        teacher: the teacher model (frozen during the run; never modified).
        student: the student model (trained in place).
        train_data: a :class:`lmslim.train.data.TokenizedSet`.
        config: the distillation losses.
        train_config: a :class:`lmslim.train.config.TrainConfig` (steps, batch, optimizer, precision, …).
        runtime: the :class:`lmslim.core.runtime.Runtime`.
        cache: an optional :class:`lmslim.compress.distill.cache.TopKCache` (teacher top-k logits on disk).
        train_kwargs: passed on to ``train`` (``eval_data``, ``evaluator``, ``out_dir``, ``resume``, …).

    Returns:
        The :class:`lmslim.train.loop.TrainResult`. The hidden-state projection (when widths differ)
        is trained and checkpointed with the student as part of the objective.
    """
    from lmslim.compress.distill.objective import DistillObjective
    from lmslim.train.loop import train

    teacher.to(runtime.device)
    objective = DistillObjective(teacher, student, config, cache=cache)
    return train(student, train_data, train_config, runtime, objective=objective, **train_kwargs)
