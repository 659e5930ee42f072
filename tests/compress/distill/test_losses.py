import math

import pytest
import torch
import torch.nn.functional as F

from lmslim.compress.distill.losses import (HiddenStateLoss, attention_kl_loss, embedding_loss, layer_map_for,
                                            logit_kd_loss, parse_layer_map, uniform_layer_map)
from lmslim.core.errors import UserError


def _softmax(xs, T=1.0):
    e = [math.exp(x / T) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def test_kd_loss_matches_hand_computation():
    # One sequence of 3 tokens, vocabulary of 3: positions 0 and 1 predict tokens 1 and 2.
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0], [3.0, 3.0, 3.0]]
    t = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0], [9.0, -9.0, 0.0]]
    ids = [0, 2, 1]
    alpha, T = 0.3, 2.0
    ce = kl = 0.0
    for pos in range(2):
        ce += -math.log(_softmax(s[pos])[ids[pos + 1]])
        ps, pt = _softmax(s[pos], T), _softmax(t[pos], T)
        kl += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    expected = alpha * ce / 2 + (1 - alpha) * T * T * kl / 2
    loss, logs = logit_kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([ids]), alpha=alpha, temperature=T)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["tokens"] == 2 and logs["ce"] == pytest.approx(ce / 2, rel=1e-5)


def _batch(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g)
    t = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return s, t, ids, mask


def test_kd_loss_ignores_padded_positions():
    s, t, ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    base, logs = logit_kd_loss(s, t, labels, mask, alpha=0.4, temperature=1.5)
    s2, t2, ids2 = s.clone(), t.clone(), ids.clone()
    pad = mask == 0
    s2[pad] = torch.randn_like(s2[pad]) * 50
    t2[pad] = torch.randn_like(t2[pad]) * 50
    ids2[pad] = 3
    # The last real position of each row has no real target either: it must not count.
    s2[1, 3, 0] += 100.0
    t2[0, -1, 0] -= 100.0
    again, _ = logit_kd_loss(s2, t2, ids2.masked_fill(pad, -100), mask, alpha=0.4, temperature=1.5)
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    assert logs["tokens"] == (7 - 1) + (4 - 1) + (2 - 1)
    # Changing a real position does change it (the test above could not pass vacuously).
    s2[0, 0, 0] += 5.0
    changed, _ = logit_kd_loss(s2, t2, ids2.masked_fill(pad, -100), mask, alpha=0.4, temperature=1.5)
    assert changed.item() != pytest.approx(base.item(), rel=1e-6)


def test_kd_alpha_extremes_and_temperature_scaling():
    s, t, ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    ce_only, _ = logit_kd_loss(s, t, labels, mask, alpha=1.0, temperature=3.0)
    ref = F.cross_entropy(s[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert ce_only.item() == pytest.approx(ref.item(), rel=1e-6)
    for T in (1.0, 2.0, 4.0):
        kd_only, logs = logit_kd_loss(s, t, None, mask, alpha=0.0, temperature=T)
        assert kd_only.item() == pytest.approx(T * T * logs["kd"], rel=1e-6)
    # Identical logits: the soft loss is zero at any temperature.
    zero, _ = logit_kd_loss(s, s.clone(), None, mask, alpha=0.0, temperature=2.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_sequence_logits_and_bad_args():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss, logs = logit_kd_loss(s, t, torch.tensor([0, 1, 2, 3]), alpha=0.5, temperature=2.0)
    assert logs["tokens"] == 4 and torch.isfinite(loss)
    with pytest.raises(UserError, match="alpha"):
        logit_kd_loss(s, t, None, alpha=1.5)
    with pytest.raises(UserError, match="temperature"):
        logit_kd_loss(s, t, None, alpha=0.0, temperature=0.0)
    with pytest.raises(UserError, match="same vocabulary"):
        logit_kd_loss(s, torch.randn(4, 6), None, alpha=0.0)
    with pytest.raises(UserError, match="needs labels"):
        logit_kd_loss(s, t, None, alpha=0.5)


def test_kd_gradient_only_to_student():
    s, t, ids, mask = _batch(2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss, _ = logit_kd_loss(s, t, ids, mask, alpha=0.5, temperature=2.0)
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert s.grad[2, 3:].abs().sum() == 0  # padded positions receive no gradient


def test_hidden_loss_projection_gets_gradients():
    torch.manual_seed(0)
    pairs = uniform_layer_map(2, 4)
    assert pairs == [(1, 2), (2, 4)]
    loss_fn = HiddenStateLoss(8, 16, pairs, kind="mse")
    student = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 5, 16) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    loss = loss_fn(student, teacher, mask)
    loss.backward()
    assert loss_fn.proj.weight.grad is not None and loss_fn.proj.weight.grad.abs().sum() > 0
    assert student[0].grad is None and student[2].grad.abs().sum() > 0  # index 0 is not mapped
    # Padded tokens do not count.
    teacher[2][1, 3:] += 100
    assert loss_fn(student, teacher, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    cos = HiddenStateLoss(16, 16, pairs, kind="cosine")
    same = [h.detach() for h in teacher]
    assert cos(same[:3], same, None).item() > 0  # different layers compared
    assert cos([same[0], same[2], same[4]], same, None).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="projection is disabled"):
        HiddenStateLoss(8, 16, pairs, projection=False)


def test_attention_kl():
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    b = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_kl_loss([a], [a.clone()], [(1, 1)]).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl_loss([a], [b], [(1, 1)]).item() > 0
    with pytest.raises(UserError, match="equal head counts"):
        attention_kl_loss([a], [torch.softmax(torch.randn(2, 2, 5, 5), -1)], [(1, 1)])


def test_embedding_loss_and_layer_maps():
    x = torch.randn(4, 8)
    assert embedding_loss(x, x.clone(), "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(x, 2 * x, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(x, 2 * x, "mse").item() == pytest.approx((x ** 2).mean().item(), rel=1e-5)
    assert layer_map_for("kept", 2, 4, kept=[0, 3]) == [(1, 1), (2, 4)]
    assert layer_map_for("last", 2, 4) == [(2, 4)]
    assert parse_layer_map("1:2,2:4") == ((1, 2), (2, 4))
    with pytest.raises(UserError, match="out of range"):
        layer_map_for(((3, 1),), 2, 4)
    with pytest.raises(UserError, match="bad layer mapping"):
        parse_layer_map("every")


def test_topk_cache_matches_full_kd_and_skips_teacher(tmp_path):
    from lmslim.assets.tiny import build_tiny
    from lmslim.compress.distill import DistillConfig, DistillObjective, student_from_layers
    from lmslim.compress.distill.cache import TopKCache, teacher_fingerprint

    teacher, _ = build_tiny("tiny-llama")
    student = student_from_layers(teacher, [1])
    ids = torch.randint(3, 200, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    cfg = DistillConfig(alpha=0.3, temperature=2.0)
    full, _ = DistillObjective(teacher, student, cfg)(student, batch)
    vocab = teacher.config.vocab_size
    cache = TopKCache(tmp_path, k=vocab, teacher_id=teacher_fingerprint(teacher))
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    cold, _ = DistillObjective(teacher, student, cfg, cache=cache)(student, batch)
    warm, _ = DistillObjective(teacher, student, cfg, cache=cache)(student, batch)
    handle.remove()
    assert len(calls) == 1 and cache.hits == 2 and cache.misses == 2  # second run: no teacher forward
    assert cold.item() == warm.item()
    assert cold.item() == pytest.approx(full.item(), rel=1e-3)  # k = V: exact up to fp16 storage
    small = TopKCache(tmp_path, k=8, teacher_id="other")
    approx, logs = DistillObjective(teacher, student, cfg, cache=small)(student, batch)
    assert small.misses == 2 and torch.isfinite(approx) and logs["tokens"] == 9 + 5
    with pytest.raises(UserError, match="top-k logits only"):
        DistillObjective(teacher, student, DistillConfig(hidden_weight=1.0), cache=small)
