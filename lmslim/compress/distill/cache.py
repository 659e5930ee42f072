"""Disk cache of the teacher's top-k logits, so repeated distillation runs skip the teacher.

Each training row is stored once, keyed by a hash of (teacher fingerprint, k, the row's real token
ids): ``<key>.safetensors`` with ``values`` (T, k) fp16 logits and ``indices`` (T, k) int32 token
ids. A different teacher, k or text gives a different key, so a stale entry can never be used.

With the cache the soft-target term uses the teacher's top-k logits only: the teacher distribution
is renormalised over its k most likely tokens and the student's log-probabilities (over the full
vocabulary) are read at those ids — the usual sparse-KD approximation; with k = V it is exact.

Example:
    >>> import tempfile
    >>> import torch
    >>> from lmslim.compress.distill.cache import TopKCache
    >>> cache = TopKCache(tempfile.mkdtemp(), k=4, teacher_id="demo")
    >>> ids, logits = torch.tensor([5, 6, 7]), torch.randn(3, 10)
    >>> cache.put(ids, logits); cache.get(ids)[0].shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmslim.core.errors import UserError


def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the teacher's parameter names, shapes and bytes (changes when any weight does)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()


class TopKCache:
    """Top-k teacher logits per token row, on disk.

    Args:
        folder: cache folder (created if missing).
        k: logits kept per position (≥ 1).
        teacher_id: identifies the teacher (e.g. :func:`teacher_fingerprint` or its weights' SHA-256).
    """

    def __init__(self, folder: str | Path, k: int, teacher_id: str):
        if k < 1:
            raise UserError(f"--top-k must be >= 1, got {k}")
        self.folder = Path(folder)
        self.k = k
        self.teacher_id = teacher_id
        self.hits = self.misses = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the teacher cache {self.folder}: {e.strerror or e}") from e

    def _path(self, ids: torch.Tensor) -> Path:
        h = hashlib.sha256(f"{self.teacher_id}|{self.k}|".encode())
        h.update(ids.to(torch.int64).cpu().numpy().tobytes())
        return self.folder / f"{h.hexdigest()[:40]}.safetensors"

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values (T, k) fp32, indices (T, k) int64) for the real tokens ``ids`` of one row, or None."""
        from safetensors.torch import load_file

        path = self._path(ids)
        if not path.is_file():
            self.misses += 1
            return None
        t = load_file(str(path))
        self.hits += 1
        return t["values"].float(), t["indices"].long()

    def put(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Store the top-k of ``logits`` (T, V) for the row ``ids`` (T,) (atomically)."""
        from safetensors.torch import save

        from lmslim.core.io import atomic_write_bytes

        values, indices = logits.detach().float().topk(min(self.k, logits.shape[-1]), dim=-1)
        data = save({"values": values.half().cpu().contiguous(), "indices": indices.int().cpu().contiguous()})
        atomic_write_bytes(self._path(ids), data)


def topk_kd(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Σ over rows of KL(p_t^k ‖ p_s) on the teacher's top-k ids: (N, V), (N, k), (N, k) → scalar sum.

    ``p_t^k`` is the teacher's softmax over its top-k logits; ``p_s`` the student's full softmax.
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices)  # (N, k)
    log_pt = F.log_softmax(values.float() / temperature, dim=-1)  # (N, k)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def topk_logit_kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                       labels: torch.Tensor | None, attention_mask: torch.Tensor | None, *, alpha: float,
                       temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`lmslim.compress.distill.losses.logit_kd_loss` (causal) with the teacher given as top-k
    logits: ``values``/``indices`` (B, T, k) instead of (B, T, V) logits."""
    from lmslim.compress.distill.losses import _positions

    keep, targets = _positions(labels, attention_mask, student_logits.shape, True, student_logits.device)
    s = student_logits[:, :-1][keep]  # (N, V)
    n = s.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0, {"ce": 0.0, "kd": 0.0, "tokens": 0}
    kd = topk_kd(s, values[:, :-1][keep].to(s.device), indices[:, :-1][keep].to(s.device), temperature) / n
    loss = (1.0 - alpha) * temperature ** 2 * kd
    ce_val = 0.0
    if alpha > 0:
        ce = F.cross_entropy(s.float(), targets[keep])
        loss = loss + alpha * ce
        ce_val = float(ce.detach())
    return loss, {"ce": ce_val, "kd": float(kd.detach()), "tokens": n}


def teacher_topk(teacher: nn.Module, cache: TopKCache, inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, k) top-k values and ids for a right-padded batch, from the cache or one teacher forward.

    The teacher runs only when some row is missing; its rows are then stored. Values always go
    through fp16 (the stored precision), so a run with a warm cache sees exactly what a cold one saw.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    b, t = ids.shape
    lengths = mask.sum(1).tolist() if mask is not None else [t] * b
    rows = [cache.get(ids[r, :n]) for r, n in enumerate(lengths)]
    if any(row is None for row in rows):
        with torch.no_grad():
            logits = teacher(**inputs, use_cache=False).logits  # (B, T, V)
        for r, n in enumerate(lengths):
            if rows[r] is None:
                cache.put(ids[r, :n], logits[r, :n])
                v, i = logits[r, :n].float().topk(min(cache.k, logits.shape[-1]), dim=-1)
                rows[r] = (v.half().float(), i.long())
    k = rows[0][0].shape[-1]
    values = torch.zeros(b, t, k, device=ids.device)
    indices = torch.zeros(b, t, k, dtype=torch.long, device=ids.device)
    for r, (v, i) in enumerate(rows):
        values[r, :v.shape[0]] = v.to(ids.device)
        indices[r, :i.shape[0]] = i.to(ids.device)
    return values, indices
