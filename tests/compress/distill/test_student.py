import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmslim.assets.tiny import build_tiny, byte_tokenizer
from lmslim.compress.distill import DistillConfig, DistillObjective
from lmslim.compress.distill.student import (check_same_vocabulary, every_kth, parse_layers, student_from_config,
                                             student_from_layers)
from lmslim.core.errors import UserError


def _teacher(layers=4):
    tok = byte_tokenizer("causal")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), tok


def test_every_kth_layer_choices():
    assert every_kth(30, 2, "first") == list(range(0, 30, 2))
    assert every_kth(30, 2, "last") == list(range(1, 30, 2))
    spread = every_kth(30, 2, "spread")
    assert len(spread) == 15 and spread[0] == 0 and spread[-1] == 29 and sorted(set(spread)) == spread
    assert every_kth(6, 2, "spread") == [0, 2, 5] and every_kth(6, 2) == [0, 2, 4]
    assert parse_layers("0,3", 4) == [0, 3]
    for bad in ("0", "x", "3,1", "0,9"):
        with pytest.raises(UserError):
            parse_layers(bad, 4)


def test_student_copies_teacher_layers_and_generates_with_cache():
    teacher, tok = _teacher(4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    layers = every_kth(4, 2, "first")
    student = student_from_layers(teacher, layers)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for i, src in enumerate(layers):
        for (name, p), (_, q) in zip(student.model.layers[i].named_parameters(),
                                     teacher.model.layers[src].named_parameters()):
            assert torch.equal(p, q), name
        assert student.model.layers[i].self_attn.layer_idx == i
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tying survives the copy
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    # The teacher is untouched (same layers, same weights).
    assert len(teacher.model.layers) == 4
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    ids = tok("the student speaks", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        plain = student.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_student_with_all_layers_equals_teacher():
    teacher, tok = _teacher(3)
    student = student_from_layers(teacher, [0, 1, 2])
    ids = tok("same model, same logits", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, teacher(ids).logits)


def test_student_of_gpt2_and_bert():
    for name in ("tiny-gpt2", "tiny-bert"):
        teacher, tok = build_tiny(name)
        student = student_from_layers(teacher, [1])
        assert student.config.num_hidden_layers == 1
        ids = tok("hello there", return_tensors="pt").input_ids
        with torch.no_grad():
            student(ids)


def test_vocab_mismatch_refused():
    teacher, tok = _teacher(2)
    bert_tok = byte_tokenizer("bert")
    with pytest.raises(UserError, match="vocabulary mismatch"):
        check_same_vocabulary(teacher, tok, teacher, bert_tok)
    other, _ = build_tiny("tiny-bert")  # 261 embeddings vs 260
    with pytest.raises(UserError, match="vocabulary mismatch"):
        check_same_vocabulary(teacher, tok, other, tok)

    class Shuffled:  # same size, different token -> id mapping
        def __init__(self, t):
            v = t.get_vocab()
            keys = sorted(v, key=v.get)
            self.v = {k: v[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}

        def get_vocab(self):
            return self.v

        def __len__(self):
            return len(self.v)

    with pytest.raises(UserError, match="different ids"):
        check_same_vocabulary(teacher, tok, teacher, Shuffled(tok))
    check_same_vocabulary(teacher, tok, student_from_layers(teacher, [0]), tok)
    with pytest.raises(UserError, match="vocabulary mismatch"):
        student_from_config(teacher, {"vocab_size": 300})


def test_student_from_config_overrides():
    teacher, _ = _teacher(4)
    student = student_from_config(teacher, {"num_hidden_layers": 1, "intermediate_size": 16})
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 16
    assert teacher.config.num_hidden_layers == 4
    with pytest.raises(UserError, match="unknown field"):
        student_from_config(teacher, {"num_hidden_layer": 1})
    with pytest.raises(UserError, match="cannot build"):
        student_from_config(teacher, {"hidden_size": 30, "head_dim": None})


def test_objective_trains_projection_not_teacher():
    teacher, _ = _teacher(4)
    student = student_from_config(teacher, {"num_hidden_layers": 2, "hidden_size": 16, "head_dim": 4,
                                            "intermediate_size": 32})
    obj = DistillObjective(teacher, student, DistillConfig(alpha=0.2, hidden_weight=1.0))
    params = list(obj.parameters())
    assert len(params) == 1 and params[0].shape == (32, 16)  # just the projection
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    loss, logs = obj(student, {"input_ids": ids, "attention_mask": mask})
    loss.backward()
    assert params[0].grad is not None and {"ce", "kd", "hidden", "loss"} <= set(logs)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student_from_layers(teacher, [0]).parameters())  # trainable again
    with pytest.raises(UserError, match="equal head counts"):
        DistillObjective(teacher, student_from_config(teacher, {"num_attention_heads": 2, "num_key_value_heads": 2,
                                                                "head_dim": 16}),
                         DistillConfig(attention_weight=1.0))


def test_distill_config_validation():
    for kw, msg in [({"alpha": -0.1}, "alpha"), ({"alpha": 1.01}, "alpha"), ({"temperature": 0}, "temperature"),
                    ({"temperature": -1}, "temperature"), ({"hidden_weight": -1}, "hidden-weight"),
                    ({"hidden_loss": "l1"}, "hidden-loss"), ({"task": "mt"}, "task"),
                    ({"layer_map": "weird"}, "layer mapping")]:
        with pytest.raises(UserError, match=msg):
            DistillConfig(**kw)
    assert DistillConfig(layer_map="1:2").layer_map == ((1, 2),)
