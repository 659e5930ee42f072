"""Distillation and sharing on the real SmolLM2-135M and all-MiniLM-L6-v2 (short runs)."""

import re

import pytest
import torch
from safetensors.torch import load_file

from lmslim.compress.distill import DistillConfig, DistillObjective, every_kth, student_from_layers
from lmslim.compress.distill.run import embed_set
from lmslim.modelio.formats.lmslim_shared import save_shared
from lmslim.compress.share import ShareConfig, share_, unique_params
from lmslim.modelio import load_model
from lmslim.core.runtime import Runtime
from lmslim.data.spec import Data, load_data
from lmslim.measure.eval import embed_texts
from lmslim.train.config import BatchConfig, LogConfig, OptimConfig, TrainConfig
from lmslim.train.loop import train

pytestmark = pytest.mark.integration


def _sentences(split, n):
    out = []
    for d in load_data(f"builtin:wiki:{split}").documents:
        out += [s for s in re.split(r"(?<=[.!?])\s+", d) if len(s.split()) >= 6]
    return out[:n]


def test_smollm_every_other_layer_student_generates_and_shared_model_reloads(tmp_path):
    lm = load_model("builtin:smollm2-135m")
    student = student_from_layers(lm.model, every_kth(30, 2))
    assert student.config.num_hidden_layers == 15
    assert torch.equal(student.model.layers[7].mlp.up_proj.weight, lm.model.model.layers[14].mlp.up_proj.weight)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        b = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)

    report = share_(lm.model, ShareConfig(group_size=2))
    save_shared(lm.model, lm.tokenizer, tmp_path)
    stored = sum(t.numel() for t in load_file(str(tmp_path / "model.safetensors")).values())
    assert stored == report["params_after"] == unique_params(lm.model) < report["params_before"]
    again = load_model(str(tmp_path)).model
    with torch.no_grad():
        assert torch.equal(again(ids).logits, lm.model(ids).logits)


def test_minilm_three_layer_student_gets_closer_to_teacher():
    t = load_model("builtin:minilm-l6", "embed")
    student = student_from_layers(t.model, every_kth(6, 2))
    test = _sentences("test", 64)

    def cos():
        a = embed_texts(student, t.tokenizer, test, max_length=64)
        b = embed_texts(t.model, t.tokenizer, test, max_length=64)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()

    before = cos()
    data = embed_set(Data("s", "embed", documents=_sentences("train", 400)), t.tokenizer, 64)
    cfg = TrainConfig(max_steps=12, optim=OptimConfig(lr=1e-4), batch=BatchConfig(batch_size=16, max_length=64),
                      log=LogConfig(tensorboard=False, progress=False))
    train(student, data, cfg, Runtime.create(device="cpu"),
          objective=DistillObjective(t.model, student, DistillConfig(task="embed")))
    student.eval()
    assert cos() > before
