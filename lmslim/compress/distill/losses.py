"""Distillation losses: logits (Hinton), hidden states and attention maps (TinyBERT/MiniLM), embeddings.

All losses are token-level means over real (non-padded) positions, so padding a batch differently
never changes the loss. Causal-LM logits are shifted the usual way: position t predicts token t+1,
and a position counts only if its target token is real.

Papers:
    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531
    Sanh et al. 2019, DistilBERT, https://arxiv.org/abs/1910.01108
    Jiao et al. 2019, TinyBERT, https://arxiv.org/abs/1909.10351
    Wang et al. 2020, MiniLM, https://arxiv.org/abs/2002.10957

Example:
    >>> import torch
    >>> from lmslim.compress.distill.losses import logit_kd_loss
    >>> s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    >>> ids = torch.randint(0, 11, (2, 5))
    >>> loss, logs = logit_kd_loss(s, t, ids, alpha=0.5, temperature=2.0)
    >>> sorted(logs)
    ['ce', 'kd', 'tokens']
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmslim.core.errors import UserError

IGNORE = -100


def _positions(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: torch.Size,
               causal: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean mask of the positions that count (B, T') and the targets there (or None).

    With ``causal`` the logits at t are scored against token t+1, so T' = T - 1.
    """
    b, t = shape[0], shape[1]
    keep = torch.ones(b, t, dtype=torch.bool, device=device)
    if attention_mask is not None:
        keep &= attention_mask.to(device=device).bool()
    targets = None
    if labels is not None:
        targets = labels.to(device)
        keep &= targets != IGNORE
    if causal:
        # Position t predicts t+1: the target (and whether it is real) comes from t+1.
        keep = keep[:, 1:]
        targets = targets[:, 1:] if targets is not None else None
    return keep, targets


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, *, alpha: float = 0.5, temperature: float = 2.0,
                  causal: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """``α·CE(labels, student) + (1−α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``.

    The T² factor keeps the soft-target gradients on the same scale as the hard-target ones when T
    changes (Hinton et al. §2). Both terms are means over the same real token positions.

    Args:
        student_logits: (B, T, V) token logits, or (B, V) sequence logits (then ``causal`` is ignored).
        teacher_logits: same shape as ``student_logits``.
        labels: (B, T) token ids (``-100`` = ignore) or (B,) class ids; needed when ``alpha > 0``.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.
        alpha: weight of the hard-label cross-entropy, in [0, 1].
        temperature: softmax temperature T > 0 for the soft targets.
        causal: shift by one (causal LM: logits at t predict token t+1).

    Returns:
        The loss (a scalar with gradients to the student) and logs ``ce``, ``kd`` (the un-weighted
        terms) and ``tokens`` (positions averaged over).
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ; teacher and student need the same vocabulary")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    if student_logits.dim() == 2:  # one prediction per sequence: every row counts
        s, t = student_logits, teacher_logits.detach()
        targets = labels
    else:
        keep, targets = _positions(labels, attention_mask, student_logits.shape, causal, student_logits.device)
        if causal:
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        # Select the real positions first: the soft-max over a large vocabulary is the memory peak.
        s, t = student_logits[keep], teacher_logits.detach()[keep]  # (N, V)
        targets = targets[keep] if targets is not None else None
    n = s.shape[0]
    if n == 0:
        zero = student_logits.sum() * 0.0  # keeps the graph; nothing to learn from an empty batch
        return zero, {"ce": 0.0, "kd": 0.0, "tokens": 0}
    s = s.float()
    t = t.float()
    # KL(p_t || p_s) = Σ p_t (log p_t − log p_s), computed from log-probabilities for stability.
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kd = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / n
    loss = (1.0 - alpha) * temperature ** 2 * kd
    ce_val = 0.0
    if alpha > 0:
        if targets is None:
            raise UserError("alpha > 0 needs labels for the hard-label cross-entropy; pass labels or use alpha=0")
        ce = F.cross_entropy(s, targets)
        loss = loss + alpha * ce
        ce_val = float(ce.detach())
    return loss, {"ce": ce_val, "kd": float(kd.detach()), "tokens": n}


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i ↔ teacher layer round(i·L_t/L_s), for i = 1..L_s (TinyBERT's uniform strategy).

    Indices refer to ``output_hidden_states`` entries: 0 is the embedding output, i the output of
    layer i, so the last student layer always meets the last teacher layer.
    """
    if n_student < 1 or n_teacher < 1:
        raise UserError("layer mapping needs at least one layer on each side")
    return [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]


def layer_map_for(spec: str | Sequence[Sequence[int]], n_student: int, n_teacher: int,
                  kept: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Resolve a layer mapping: ``uniform``, ``last``, ``kept`` (a student cut from the teacher: its
    layer i came from teacher layer ``kept[i-1]``) or explicit ``(student, teacher)`` pairs."""
    if isinstance(spec, str):
        if spec == "uniform":
            return uniform_layer_map(n_student, n_teacher)
        if spec == "last":
            return [(n_student, n_teacher)]
        if spec == "kept":
            if kept is None:
                return uniform_layer_map(n_student, n_teacher)
            return [(i + 1, k + 1) for i, k in enumerate(kept)]
        raise UserError(f"unknown layer mapping {spec!r}; use uniform, last, kept or explicit pairs 's:t,s:t'")
    pairs = [(int(a), int(b)) for a, b in spec]
    for s, t in pairs:
        if not (0 <= s <= n_student and 0 <= t <= n_teacher):
            raise UserError(f"layer pair {s}:{t} is out of range (student 0..{n_student}, teacher 0..{n_teacher}; "
                            "0 is the embedding output)")
    return pairs


def parse_layer_map(text: str) -> str | tuple[tuple[int, int], ...]:
    """``uniform`` | ``last`` | ``kept`` | ``"1:2,2:4"`` (student:teacher pairs)."""
    text = text.strip()
    if text in ("uniform", "last", "kept"):
        return text
    try:
        return tuple((int(a), int(b)) for a, b in (p.split(":") for p in text.split(",")))
    except ValueError as e:
        raise UserError(f"bad layer mapping {text!r}; use uniform, last, kept or pairs like 1:2,2:4") from e


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token ``values`` (B, T) over real tokens."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def _per_token(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, D) × 2 → (B, T): mean squared error or 1 − cosine similarity per token."""
    if kind == "mse":
        return (a - b).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1)
    raise UserError(f"unknown hidden loss {kind!r}; use mse or cosine")


class HiddenStateLoss(nn.Module):
    """Match student hidden states to the teacher's at mapped layers (TinyBERT §3.1, hidden-state loss).

    When the widths differ a learned linear projection (student width → teacher width, shared by all
    mapped layers, as TinyBERT's W_h) maps the student's states; it is a parameter of this module, so
    it must be trained together with the student.

    Args:
        student_width, teacher_width: hidden sizes.
        pairs: (student index, teacher index) into ``output_hidden_states`` (0 = embeddings).
        kind: ``mse`` or ``cosine``.
        projection: allow a projection when widths differ (else widths must match).
    """

    def __init__(self, student_width: int, teacher_width: int, pairs: Sequence[tuple[int, int]],
                 kind: str = "mse", projection: bool = True):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise UserError(f"unknown hidden loss {kind!r}; use mse or cosine")
        self.kind = kind
        self.pairs = list(pairs)
        self.proj: nn.Module = nn.Identity()
        if student_width != teacher_width:
            if not projection:
                raise UserError(f"student width {student_width} differs from teacher width {teacher_width} and "
                                "projection is disabled; enable the projection or use logit KD only")
            self.proj = nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        total = 0.0
        for s_i, t_i in self.pairs:
            hs = self.proj(student_hidden[s_i])  # (B, T, D_t)
            total = total + _masked_mean(_per_token(self.kind, hs.float(), teacher_hidden[t_i].detach().float()),
                                         attention_mask)
        return total / max(len(self.pairs), 1)


def attention_kl_loss(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                      pairs: Sequence[tuple[int, int]], attention_mask: torch.Tensor | None = None,
                      eps: float = 1e-9) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions of mapped layers (MiniLM §3.1).

    Args:
        student_attn, teacher_attn: per-layer (B, H, T, T) attention probabilities (``output_attentions``).
        pairs: (student layer, teacher layer), 1-based like hidden-state indices (layer i ↔ entry i-1).
        attention_mask: (B, T); padded query rows are left out (padded keys already get ~0 probability).

    Head counts must match: MiniLM compares head by head.
    """
    total = 0.0
    for s_i, t_i in pairs:
        if s_i < 1 or t_i < 1:
            continue  # index 0 is the embedding output: it has no attention map
        a_s, a_t = student_attn[s_i - 1], teacher_attn[t_i - 1].detach()
        if a_s.shape[1] != a_t.shape[1]:
            raise UserError(f"attention loss needs equal head counts (student {a_s.shape[1]}, teacher "
                            f"{a_t.shape[1]}); drop the attention loss or use a student with the teacher's heads")
        a_s, a_t = a_s.float(), a_t.float()
        kl = (a_t * (torch.log(a_t + eps) - torch.log(a_s + eps))).sum(-1)  # (B, H, T)
        mask = attention_mask[:, None, :].expand_as(kl) if attention_mask is not None else None
        total = total + _masked_mean(kl.flatten(1), mask.flatten(1) if mask is not None else None)
    return total / max(len(pairs), 1)


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embedding: mean over real tokens, (B, T, D) → (B, D) (sentence-transformers pooling)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embedding_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Sentence-embedding distillation: mean (1 − cosine) or MSE over the batch, (B, D) × 2 → scalar."""
    return _per_token(kind, student_emb.float()[None], teacher_emb.detach().float()[None]).mean()
