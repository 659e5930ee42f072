import hashlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmslim.compress.distill import student_from_config, student_from_layers
from lmslim.compress.distill.blockwise import (BlockwiseConfig, blockwise_distill_, calibration_rows, relative_error,
                                               teacher_spans)
from lmslim.core.errors import UserError
from lmslim.core.runtime import Runtime


def _teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _final_error(student, teacher, ids) -> float:
    s = student(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    t = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float(relative_error(s, t))


def test_spans_cover_every_teacher_block_once():
    for kept, n in (([0, 2, 4], 6), ([1, 3], 5), ([0, 5], 6), ([3], 4)):
        spans = teacher_spans(kept, n)
        covered = [j for a, b in spans for j in range(a, b)]
        assert covered == list(range(n)), (kept, spans)
        assert all(a <= k < b for k, (a, b) in zip(kept, spans))


def test_blockwise_fit_brings_the_student_closer_to_the_teacher():
    teacher = _teacher()
    before_hash = _digest(teacher)
    student = student_from_layers(teacher, [0, 2])
    rows = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    err_before = _final_error(student, teacher, held_out)
    report = blockwise_distill_(teacher, student, rows, BlockwiseConfig(epochs=6, lr=3e-3, batch_size=4),
                                Runtime.create("cpu"))
    assert [b["teacher_span"] for b in report["blocks"]] == [[0, 2], [2, 4]]
    for b in report["blocks"]:
        assert b["loss_after"] < 0.8 * b["loss_before"], b
    # The end-to-end effect on text it was not fitted on: the student's last hidden states move toward the teacher's.
    assert _final_error(student, teacher, held_out) < 0.8 * err_before
    assert _digest(teacher) == before_hash  # the teacher is never modified
    assert all(p.requires_grad for p in teacher.parameters())  # and its flags are restored


def test_blockwise_refuses_a_student_without_a_layer_map_and_bad_configs():
    teacher = _teacher()
    fresh = student_from_config(teacher, {"num_hidden_layers": 2})
    with pytest.raises(UserError, match="cut from this teacher"):
        blockwise_distill_(teacher, fresh, torch.zeros(2, 8, dtype=torch.long), BlockwiseConfig(epochs=1),
                           Runtime.create("cpu"))
    for bad in ({"epochs": -1}, {"lr": 0}, {"samples": 0}, {"seq_len": 1}, {"batch_size": 1.5}):
        with pytest.raises(UserError, match="blockwise"):
            BlockwiseConfig(**bad)


def test_calibration_rows_are_full_length_and_seeded():
    examples = [{"input_ids": list(range(i, i + n))} for i, n in enumerate([10, 40, 40, 3, 40, 40])]
    cfg = BlockwiseConfig(samples=3, seq_len=32)
    rows = calibration_rows(examples, cfg)
    assert rows.shape == (3, 32)
    assert torch.equal(rows, calibration_rows(examples, cfg))
    with pytest.raises(UserError, match="lower blockwise.seq_len"):
        calibration_rows(examples, BlockwiseConfig(seq_len=64))
