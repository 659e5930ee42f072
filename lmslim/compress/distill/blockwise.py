"""Block-wise (local) distillation: re-fit each student block to the teacher blocks it replaces.

A student cut from the teacher's layers (``student_from_layers``) starts broken: when a 30-layer model
keeps every other block, each kept block receives a residual stream it was never trained on and must
do the work of two. End-to-end KD fixes this slowly, because every step pays for the teacher, the
whole student and the vocabulary-sized softmax, and its gradient reaches each block only through all
the blocks above it.

Here every student block ``i`` is trained on its own, on calibration text, to map the hidden states
that enter it to the teacher's hidden states at the end of the span of teacher blocks it stands for
(teacher blocks ``kept[i] .. kept[i+1]-1``; the last block's span runs to the teacher's last block, the
first one's starts at block 0). Blocks are fitted in order, and block ``i`` sees what the already
fitted student blocks ``0..i-1`` really produce (not the teacher's states), so errors do not compound
unseen. The loss is the per-token relative squared error ``‖s − t‖² / ‖t‖²`` averaged over tokens: the
final RMS/LayerNorm makes the logits depend on each token's direction, and a few tokens with huge
activations would otherwise dominate. One block's fwd+bwd on a few thousand tokens is a small job, so
this costs a fraction of the same number of end-to-end KD steps; follow it with logit KD.

Related work: layer-wise/block-wise distillation of replaced layers as in LLM-Streamline
(Chen et al. 2024, https://arxiv.org/abs/2403.19135) and blockwise KD (Wang et al. 2018,
https://arxiv.org/abs/1805.09960); the sequential "calibrate on what the compressed blocks before
produce" scheme is GPTQ's (Frantar et al. 2022, https://arxiv.org/abs/2210.17323).

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.distill import student_from_layers
    >>> from lmslim.compress.distill.blockwise import BlockwiseConfig, blockwise_distill_
    >>> from lmslim.core.runtime import Runtime
    >>> teacher, _ = build_tiny("tiny-llama")
    >>> student = student_from_layers(teacher, [0])
    >>> rows = torch.randint(3, 200, (8, 32))
    >>> report = blockwise_distill_(teacher, student, rows, BlockwiseConfig(epochs=2, batch_size=4),
    ...                             Runtime.create("cpu"))
    >>> report["blocks"][0]["teacher_span"], report["blocks"][0]["loss_after"] < report["blocks"][0]["loss_before"]
    ([0, 2], True)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lmslim.compress.calibration import BlockInput, capture_block_inputs, run_block, transformer_blocks
from lmslim.compress.distill.api import DISTILLERS
from lmslim.core.configs import check_fields
from lmslim.core.errors import UserError
from lmslim.data.calib import frame_window, text_framing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockwiseConfig:
    """How each student block is re-fitted.

    Attributes:
        epochs: passes over the calibration rows per block (0 = off).
        lr: AdamW learning rate (cosine decay to 10% over the block's steps, no weight decay).
        samples: calibration rows taken from the training data (each ``seq_len`` tokens).
        seq_len: tokens per calibration row.
        batch_size: rows per optimizer step.
        grad_clip: clip each block's gradient norm to this (0 = off).
        seed: row sampling and shuffling.
    """

    epochs: int = 4
    lr: float = 1e-3
    samples: int = 128
    seq_len: int = 256
    batch_size: int = 2
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "blockwise.")
        for name in ("epochs", "samples", "seq_len", "batch_size"):
            v = getattr(self, name)
            low = 0 if name == "epochs" else (2 if name == "seq_len" else 1)
            if v < low:
                raise UserError(f"blockwise.{name} must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"blockwise.lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            raise UserError(f"blockwise.grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")


def teacher_spans(kept: list[int], n_teacher: int) -> list[tuple[int, int]]:
    """``[start, end)`` teacher blocks each student block stands for.

    >>> teacher_spans([0, 2, 4], 6)
    [(0, 2), (2, 4), (4, 6)]
    >>> teacher_spans([1, 3], 5)  # the first block also covers the dropped block 0, the last runs to the end
    [(0, 3), (3, 5)]
    """
    return [(0 if i == 0 else k, kept[i + 1] if i + 1 < len(kept) else n_teacher) for i, k in enumerate(kept)]


def relative_error(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``‖s − t‖² / ‖t‖²`` for (B, T, D) hidden states."""
    err = (student.float() - target.float()).pow(2).sum(-1)  # (B, T)
    return (err / target.float().pow(2).sum(-1).clamp_min(1e-6)).mean()


def calibration_rows(examples: list[dict[str, Any]], config: BlockwiseConfig, prefix: tuple[int, ...] = ()
                     ) -> torch.Tensor:
    """Up to ``config.samples`` rows of exactly ``config.seq_len`` tokens from tokenized clm examples (seeded).

    ``prefix``: the tokenizer's start token(s) (``lmslim.data.calib.text_framing``); a packed row that
    begins mid-document gets them in place of its first token(s), so every row starts as text does.
    """
    ids = [list(e["input_ids"]) for e in examples]
    rows = [frame_window(torch.tensor(x[:config.seq_len]), prefix).tolist() for x in ids if len(x) >= config.seq_len]
    if not rows:
        longest = max((len(x) for x in ids), default=0)
        raise UserError(f"blockwise distillation needs training rows of {config.seq_len} tokens; the longest has "
                        f"{longest}; lower blockwise.seq_len")
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(rows), generator=g)[:config.samples].tolist()
    return torch.tensor([rows[i] for i in order], dtype=torch.long)  # (N, T)


def fit_on_data(teacher: nn.Module, student: nn.Module, data: Any, tokenizer: Any, config: BlockwiseConfig,
                runtime: Any, max_length: int | None = None) -> dict[str, Any]:
    """:func:`blockwise_distill_` on calibration rows cut from loaded clm text (a :class:`~lmslim.data.spec.Data`).

    ``max_length`` (the training rows' length) caps ``config.seq_len``, so the fit never sees longer rows
    than the KD that follows it.
    """
    from dataclasses import replace

    from lmslim.train.data import tokenize

    if max_length is not None:
        config = replace(config, seq_len=min(config.seq_len, max_length))
    rows = calibration_rows(tokenize(data, tokenizer, "clm", config.seq_len, True).examples, config,
                            text_framing(tokenizer).prefix)
    return blockwise_distill_(teacher, student, rows, config, runtime)


def _kept_layers(student: nn.Module, n_teacher: int) -> list[int]:
    info = getattr(student.config, "lmslim_student", None) or {}
    kept = info.get("kept")
    if info.get("kind") != "layers" or not kept or info.get("teacher_layers") != n_teacher:
        raise UserError("blockwise distillation needs a student cut from this teacher's layers "
                        "(--student-layers); this student has no such layer map")
    return list(kept)


def _fit_block(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor], config: BlockwiseConfig,
               generator: torch.Generator) -> tuple[float, float, list[torch.Tensor]]:
    """Train one block on (input, target) pairs.

    Returns:
        The loss over all rows before and after training, and the trained block's outputs (the next
        block's inputs; computed once, with the "after" loss).
    """

    @torch.no_grad()
    def full_pass() -> tuple[float, list[torch.Tensor]]:
        total, n, outputs = 0.0, 0, []
        for inp, tgt in zip(inputs, targets):
            outputs.append(run_block(block, inp))
            total += float(relative_error(outputs[-1], tgt)) * tgt.shape[0]
            n += tgt.shape[0]
        return total / n, outputs

    before, _ = full_pass()
    params = [p for p in block.parameters() if p.requires_grad]
    steps = config.epochs * len(inputs)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    block.train()
    for _ in range(config.epochs):
        for j in torch.randperm(len(inputs), generator=generator).tolist():
            loss = relative_error(run_block(block, inputs[j]), targets[j])
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    block.eval()
    after, outputs = full_pass()
    return before, after, outputs


@DISTILLERS.register("blockwise", BlockwiseConfig)
def blockwise_distill_(teacher: nn.Module, student: nn.Module, rows: torch.Tensor, config: BlockwiseConfig,
                       runtime: Any) -> dict[str, Any]:
    """Re-fit each block of ``student`` (cut from ``teacher``'s layers) to the teacher span it replaces, in place.

    Args:
        teacher: the full model (read only).
        student: a model from :func:`lmslim.compress.distill.student_from_layers` of ``teacher``.
        rows: calibration token ids (N, T), no padding.
        config: a :class:`BlockwiseConfig`.
        runtime: the :class:`lmslim.core.runtime.Runtime` (device).

    Returns:
        A report: per block, its teacher span and the relative error before and after fitting.
    """
    t0 = time.perf_counter()
    _, t_blocks = transformer_blocks(teacher)
    _, s_blocks = transformer_blocks(student)
    kept = _kept_layers(student, len(t_blocks))
    if len(kept) != len(s_blocks):
        raise UserError(f"the student has {len(s_blocks)} blocks but its layer map lists {len(kept)}")
    report: dict[str, Any] = {"config": asdict(config), "rows": list(rows.shape), "blocks": []}
    if config.epochs == 0:
        return report
    device = runtime.device
    teacher.to(device).eval()
    student.to(device)
    rows = rows.to(device)
    t_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)
    use_cache = [getattr(m.config, "use_cache", None) for m in (teacher, student)]
    for m in (teacher, student):
        m.config.use_cache = False
    g = torch.Generator().manual_seed(config.seed)
    try:
        # What enters block 0 (embeddings output, rotary tables, masks) is the same for teacher and student:
        # the student copied the teacher's embeddings.
        inputs = capture_block_inputs(teacher, t_blocks[0], rows, config.batch_size)
        t_stream = [inp.hidden for inp in inputs]  # the teacher's residual stream, advanced span by span
        s_inputs = inputs  # what the fitted student blocks produce
        for i, (start, end) in enumerate(teacher_spans(kept, len(t_blocks))):
            with torch.no_grad():
                for j in range(start, end):
                    t_stream = [run_block(t_blocks[j], BlockInput(h, inp.kwargs)) for h, inp in zip(t_stream, inputs)]
            before, after, outputs = _fit_block(s_blocks[i], s_inputs, t_stream, config, g)
            s_inputs = [BlockInput(h, inp.kwargs) for h, inp in zip(outputs, s_inputs)]
            report["blocks"].append({"block": i, "teacher_span": [start, end], "loss_before": before,
                                     "loss_after": after})
            if runtime.is_main:
                log.info("blockwise: student block %d (teacher %d-%d): relative error %.4f -> %.4f", i, start,
                         end - 1, before, after)
    finally:
        for p, r in zip(teacher.parameters(), t_grad):
            p.requires_grad_(r)
        for m, u in zip((teacher, student), use_cache):
            m.config.use_cache = u
        student.eval()
    report["seconds"] = time.perf_counter() - t0
    return report
