"""The distillation objective: a frozen teacher and the losses, as one ``objective(model, batch)``.

The training loop (``lmslim.train``) calls ``objective(student, batch) -> (loss, logs)`` for each
micro-batch. The teacher runs in eval mode under ``torch.no_grad`` on the student's device; it is
not a sub-module of the objective, so ``objective.parameters()`` holds only what must be trained
with the student (the hidden-state projection when widths differ).

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.distill import DistillConfig, DistillObjective, student_from_layers
    >>> teacher, _ = build_tiny("tiny-llama")
    >>> student = student_from_layers(teacher, [1])
    >>> objective = DistillObjective(teacher, student, DistillConfig(alpha=0.5, temperature=2.0, hidden_weight=1.0))
    >>> ids = torch.randint(3, 200, (2, 16))
    >>> loss, logs = objective(student, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    >>> loss.requires_grad
    True
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lmslim.compress.calibration import transformer_blocks
from lmslim.compress.distill.api import DistillConfig
from lmslim.compress.distill.losses import (IGNORE, HiddenStateLoss, attention_kl_loss, embedding_loss,
                                            layer_map_for, logit_kd_loss, mean_pooled)
from lmslim.core.errors import UserError


def _width(model: nn.Module) -> int:
    cfg = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise UserError(f"{type(model).__name__}: cannot tell the hidden width from its config")


def _heads(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0))


class DistillObjective(nn.Module):
    """Loss of a student against a frozen teacher, for the training loop.

    Args:
        teacher: the teacher model (not modified; put in eval mode, gradients off).
        student: the student (only read here, to size projections and check compatibility).
        config: the :class:`DistillConfig`.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig, cache: Any = None):
        super().__init__()
        self.config = config
        self.cache = cache  # a TopKCache: soft targets from cached teacher top-k logits
        if cache is not None and (config.task != "clm" or config.hidden_weight > 0 or config.attention_weight > 0):
            raise UserError("the teacher cache holds top-k logits only (task clm); drop --teacher-cache or the "
                            "hidden-state / attention losses")
        # Not a registered sub-module: the teacher's weights must not reach the optimizer or checkpoints.
        object.__setattr__(self, "teacher", teacher)
        teacher.eval()
        teacher.requires_grad_(False)
        n_s, n_t = len(transformer_blocks(student)[1]), len(transformer_blocks(teacher)[1])
        kept = (getattr(student.config, "lmslim_student", None) or {}).get("kept")
        self.pairs = layer_map_for(config.layer_map, n_s, n_t, kept)
        self.hidden: HiddenStateLoss | None = None
        if config.hidden_weight > 0:
            self.hidden = HiddenStateLoss(_width(student), _width(teacher), self.pairs, config.hidden_loss,
                                          config.projection)
        if config.attention_weight > 0:
            if _heads(student) != _heads(teacher):
                raise UserError(f"attention loss needs equal head counts (student {_heads(student)}, teacher "
                                f"{_heads(teacher)}); drop --attention-weight")
            # Attention probabilities are only returned by the eager attention implementation.
            for m in (student, teacher):
                if hasattr(m, "set_attn_implementation"):
                    m.set_attn_implementation("eager")
        if config.task == "embed" and _width(student) != _width(teacher):
            raise UserError(f"embedding distillation compares sentence vectors directly: student width "
                            f"{_width(student)} must equal teacher width {_width(teacher)}")

    def _inputs(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: batch[k].to(device) for k in keys if k in batch and batch[k] is not None}

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        device = next(model.parameters()).device
        inputs = self._inputs(batch, device)
        mask = inputs.get("attention_mask")
        want_hidden = self.hidden is not None or cfg.task == "embed"
        want_attn = cfg.attention_weight > 0
        kw = {"output_hidden_states": want_hidden, "output_attentions": want_attn}
        if cfg.task == "clm":
            kw["use_cache"] = False
        teacher = self.teacher.to(device)
        if self.cache is not None:
            return self._cached(model, batch, inputs)
        with torch.no_grad():  # the teacher only provides targets; no graph, no activations kept
            t_out = teacher(**inputs, **kw)
        s_out = model(**inputs, **kw)
        logs: dict[str, float] = {}
        if cfg.task == "embed":
            s_emb = mean_pooled(s_out.last_hidden_state, mask)
            t_emb = mean_pooled(t_out.last_hidden_state, mask)
            loss = embedding_loss(s_emb, t_emb, cfg.embed_loss)
            logs["embed"] = float(loss.detach())
        else:
            labels = batch.get("labels")
            if labels is None and cfg.task == "clm":
                labels = inputs["input_ids"].masked_fill(mask == 0, IGNORE) if mask is not None else inputs["input_ids"]
            loss, kd_logs = logit_kd_loss(s_out.logits, t_out.logits, labels, mask, alpha=cfg.alpha,
                                          temperature=cfg.temperature, causal=cfg.task == "clm")
            logs.update(kd_logs)
        if self.hidden is not None:
            h = self.hidden(s_out.hidden_states, t_out.hidden_states, mask)
            loss = loss + cfg.hidden_weight * h
            logs["hidden"] = float(h.detach())
        if want_attn:
            a = attention_kl_loss(s_out.attentions, t_out.attentions, self.pairs, mask)
            loss = loss + cfg.attention_weight * a
            logs["attention"] = float(a.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def _cached(self, model: nn.Module, batch: Mapping[str, Any], inputs: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        from lmslim.compress.distill.cache import teacher_topk, topk_logit_kd_loss

        values, indices = teacher_topk(self.teacher, self.cache, inputs)
        mask = inputs.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = inputs["input_ids"].masked_fill(mask == 0, IGNORE) if mask is not None else inputs["input_ids"]
        s_out = model(**inputs, use_cache=False)
        loss, logs = topk_logit_kd_loss(s_out.logits, values, indices, labels, mask, alpha=self.config.alpha,
                                        temperature=self.config.temperature)
        logs["loss"] = float(loss.detach())
        return loss, logs
