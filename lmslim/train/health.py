"""Training health: stop a run that diverges or collapses, and save only weights that are still good.

A run with a far too high learning rate rarely crashes by itself. Its loss jumps, the softmax
saturates, the gradients become exactly zero and the loss freezes; the loop would go on and write a
broken model with a success exit. :class:`HealthMonitor` watches what every step measures anyway
(the loss and the gradient norm, before the update is applied) and the weights whenever something
is about to be saved, and raises :class:`TrainingDiverged` (a ``UserError``: one line, exit 2) that
names the last good checkpoint.

A step is unhealthy when its loss or gradient norm is not finite, when either is more than
``health.loss_factor`` / ``health.grad_factor`` times its running average (an EMA over ~10 healthy
steps) and above the run's first value (so a small loss near convergence may wobble), or when the
gradient norm has been exactly zero for ``health.zero_grad_steps`` steps in a row. The weights are
unhealthy when a trainable parameter is not finite or larger than ``health.max_weight``.

What "healthy at checkpoint time" means here: the checkpoint at step N is written only if every step
since the previous one was healthy (an unhealthy step stops the run at once), no zero-gradient streak
is running and the weights are finite and sane. Its weights are judged once more by step N + 1, whose
loss and gradient are the first ones computed *from* them: until that step is healthy the checkpoint
is pending, and if training diverges right there, the checkpoint is removed, because the update that
broke the model happened before it was written (what a step-N loss cannot show yet). Older
checkpoints are pruned only once the newest one is confirmed, so ``checkpoint.keep_last`` good ones
remain. The checks only read numbers the loop computes anyway (one extra pass over the weights when
something is saved), so a healthy run's trajectory is bit-identical with or without them.

Example:
    >>> from lmslim.train.config import HealthConfig
    >>> from lmslim.train.health import HealthMonitor
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> h = HealthMonitor(HealthConfig(), [("w", w)])
    >>> h.check_step(1, 5.0, 2.0); h.check_step(2, 4.0, 1.0)
    >>> h.check_step(3, 1e6, 1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lmslim.train.health.TrainingDiverged: training diverged at step 3: the loss jumped to 1e+06, more than ...
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from lmslim.core.errors import UserError
from lmslim.train import checkpoint as ckpt
from lmslim.train.config import HealthConfig

log = logging.getLogger(__name__)

EMA_BETA = 0.9  # running averages remember ~10 steps: long enough to smooth noise, short enough to follow the run
START_MARGIN = 10.0  # a model whose weights start large may grow to this many times its largest one


class TrainingDiverged(UserError):
    """Training diverged or collapsed; only checkpoints written while it was healthy are kept."""


class HealthMonitor:
    """Per-run health state: running averages, zero-gradient streak, the pending checkpoint.

    Args:
        config: the ``health`` section of the training config.
        params: the trainable (name, parameter) pairs whose weights are checked before saving.
        runtime: the loop's runtime (``None``: one process); under torchrun every rank holds one
            and every rank reaches the same verdicts (the loss and gradient norm are global; the
            weight check is reduced over ranks).
        ckpt_root: ``DIR/checkpoints`` (``None`` trains in memory).
        keep_last: ``checkpoint.keep_last``.
        write: whether this process writes (rank 0 with an output folder): it prunes and removes.
        state: :meth:`state_dict` of a checkpoint being resumed (``None``: a new run).
    """

    def __init__(self, config: HealthConfig, params: list[tuple[str, torch.Tensor]], runtime: Any = None,
                 ckpt_root: Path | None = None, keep_last: int = 1, write: bool = False,
                 state: dict[str, Any] | None = None) -> None:
        self.config = config
        self.params = [(n, p) for n, p in params if p.requires_grad]
        self.runtime = runtime
        self.root = ckpt_root
        self.keep_last = keep_last
        self.write = write
        self.pending: Path | None = None  # written, not yet confirmed by the next step
        self._checked: int | None = None  # step whose weights were last found good
        s = dict(state or {})
        self.ema_loss: float | None = s.get("ema_loss")
        self.ema_grad: float | None = s.get("ema_grad")
        self.first_loss: float | None = s.get("first_loss")
        self.first_grad: float | None = s.get("first_grad")
        self.zero_streak: int = int(s.get("zero_streak", 0))
        self.start_weight: float | None = s.get("start_weight")
        if config.enabled and config.max_weight and self.start_weight is None:
            self.start_weight = self._largest_weight()[0]

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers for the checkpoint (a resumed run keeps its baselines)."""
        return {"ema_loss": self.ema_loss, "ema_grad": self.ema_grad, "first_loss": self.first_loss,
                "first_grad": self.first_grad, "zero_streak": self.zero_streak, "start_weight": self.start_weight}

    # ------------------------------------------------------------------------------------------ per step
    def check_step(self, step: int, loss: float, grad_norm: float, scaled: bool = False) -> None:
        """Judge optimizer step ``step`` before its update is applied; raise :class:`TrainingDiverged` if bad.

        Args:
            loss: the step's (global) mean loss.
            grad_norm: the global gradient norm before clipping.
            scaled: fp16 loss scaling is on: a non-finite gradient only makes the GradScaler skip the step.
        """
        if not math.isfinite(loss):  # always: the optimizer state would be poisoned
            raise self.diverged(step, f"the training loss became {loss}")
        c = self.config
        if not c.enabled:
            return
        if not math.isfinite(grad_norm):
            if scaled:
                return  # the GradScaler skips this step and lowers its scale; nothing is applied
            raise self.diverged(step, f"the gradient norm became {grad_norm}")
        if c.loss_factor and _exploding(loss, self.ema_loss, self.first_loss, c.loss_factor):
            raise self.diverged(step, f"the loss jumped to {loss:.4g}, more than health.loss_factor="
                                      f"{c.loss_factor:g} x its running average {self.ema_loss:.4g}")
        if c.grad_factor and _exploding(grad_norm, self.ema_grad, self.first_grad, c.grad_factor):
            raise self.diverged(step, f"the gradient norm jumped to {grad_norm:.4g}, more than health.grad_factor="
                                      f"{c.grad_factor:g} x its running average {self.ema_grad:.4g}")
        if grad_norm == 0.0 and c.zero_grad_steps:
            self.zero_streak += 1
            if self.zero_streak >= c.zero_grad_steps:
                raise self.diverged(step, f"the gradient norm has been 0 for {self.zero_streak} steps in a row: the "
                                          "model collapsed (saturated outputs) and no longer learns")
            return  # suspect: no checkpoint, the pending one stays unconfirmed
        self.zero_streak = 0
        self.ema_loss = loss if self.ema_loss is None else EMA_BETA * self.ema_loss + (1 - EMA_BETA) * loss
        if grad_norm > 0:
            self.ema_grad = grad_norm if self.ema_grad is None else \
                EMA_BETA * self.ema_grad + (1 - EMA_BETA) * grad_norm
            self.first_grad = grad_norm if self.first_grad is None else self.first_grad
        self.first_loss = loss if self.first_loss is None else self.first_loss
        if self.pending is not None:  # the first step computed from its weights was healthy
            self.pending = None
            self._prune(self.keep_last)

    # ------------------------------------------------------------------------------------------ saving
    def may_save(self, step: int, final: bool) -> bool:
        """Whether a checkpoint may be written after step ``step``; raises if the weights are broken.

        Args:
            final: the run ends here (its last checkpoint and the final model): a running
                zero-gradient streak then stops the run instead of skipping the save.

        Returns:
            False while a zero-gradient streak runs (the save is skipped, training goes on).
        """
        if not self.config.enabled:
            return True
        if self.zero_streak:
            if final:
                raise self.diverged(step, f"the gradient norm was 0 for the last {self.zero_streak} steps: the "
                                          "model may have collapsed", applied=True)
            if self.write:
                log.warning("step %d: checkpoint skipped: the gradient norm has been 0 for %d steps in a row", step,
                            self.zero_streak)
            return False
        self.check_weights(step)
        return True

    def check_weights(self, step: int) -> None:
        """Raise :class:`TrainingDiverged` if a trainable parameter is not finite or absurdly large."""
        if not self.config.enabled or self._checked == step:
            return
        largest, name = self._largest_weight()
        if not math.isfinite(largest):
            raise self.diverged(step, f"parameter {name} is not finite ({largest})", applied=True)
        limit = self.limit
        if limit and largest > limit:
            raise self.diverged(step, f"parameter {name} reached {largest:.3g} (limit {limit:.3g}, health.max_weight)",
                                applied=True)
        self._checked = step

    @property
    def limit(self) -> float:
        """The largest magnitude a saved parameter may have (0 = no limit)."""
        c = self.config
        if not c.max_weight:
            return 0.0
        return max(c.max_weight, START_MARGIN * (self.start_weight or 0.0))

    def saved(self, folder: Path) -> None:
        """Register the checkpoint just written: it is pending until the next healthy step."""
        if self.config.enabled:
            self.pending = folder
            self._prune(self.keep_last + 1)  # keep_last confirmed ones besides the pending one
        else:
            self._prune(self.keep_last)

    def finish(self) -> None:
        """The run ended healthy (its end was checked by :meth:`may_save`): prune to ``keep_last``."""
        if self.pending is not None:
            self.pending = None
            self._prune(self.keep_last)

    # ------------------------------------------------------------------------------------------ failing
    def diverged(self, step: int, reason: str, applied: bool = False) -> TrainingDiverged:
        """The error to raise: removes the pending checkpoint and names the last good one."""
        when = "nothing was saved at this step" if applied else "stopped before applying the step"
        if self.root is None:
            kept = "training ran without an output folder (no checkpoint)"
        else:
            removed = self.pending
            good = [p for p in ckpt.list_checkpoints(self.root) if removed is None or p.name != removed.name]
            if removed is not None and self.write:
                shutil.rmtree(removed, ignore_errors=True)
            kept = f"the last good checkpoint is {good[-1]} (step {int(good[-1].name.split('-')[1])})" if good \
                else "no good checkpoint was written"
            if removed is not None:
                kept += f"; removed {removed.name}, whose weights gave this step's numbers"
            self.pending = None
        return TrainingDiverged(f"training diverged at step {step}: {reason}; {when}; {kept}; lower optim.lr, add "
                                "schedule.warmup_steps or keep optim.grad_clip on (health.* tunes these checks)")

    # ------------------------------------------------------------------------------------------ helpers
    def _prune(self, keep: int) -> None:
        if self.write and self.root is not None:
            ckpt.prune_checkpoints(self.root, keep)

    def _largest_weight(self) -> tuple[float, str]:
        """(largest |value|, its parameter's name) over the trainable parameters of every rank; NaN wins."""
        worst, name = 0.0, ""
        local = [(n, p.detach().to_local() if hasattr(p, "to_local") else p.detach()) for n, p in self.params]
        local = [(n, t) for n, t in local if t.numel()]
        if local:
            with torch.no_grad():  # one host transfer for all of them
                values = torch.stack([t.abs().amax().float() for _, t in local]).tolist()
            for (n, _), v in zip(local, values):
                if _worse(v, worst):
                    worst, name = v, n
        rt = self.runtime
        if rt is not None and rt.is_distributed:  # FSDP shards differ per rank; every rank must agree
            from lmslim.train.distributed import all_gather_object

            for v, n in all_gather_object((worst, name), rt):
                if _worse(v, worst):
                    worst, name = v, n
        return worst, name


def _worse(value: float, worst: float) -> bool:
    """``value`` replaces ``worst``: larger, or the first NaN (a NaN is kept once found)."""
    return not math.isnan(worst) and (math.isnan(value) or value > worst)


def _exploding(value: float, ema: float | None, first: float | None, factor: float) -> bool:
    """``value`` is far above its running average and above where the run started."""
    return ema is not None and ema > 0 and first is not None and value > factor * ema and value > first
