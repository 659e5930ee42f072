import json

import pytest

from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.data.spec import Data
from lmslim.data.synthetic import synthetic_ner, synthetic_sentiment
from lmslim.measure.eval import classify, token_classify
from lmslim.train.config import TrainConfig
from lmslim.train.data import tokenize
from lmslim.train.loop import train
from lmslim.train.tasks import load_for_training


def _labels(model):
    return [model.config.id2label[i] for i in range(len(model.config.id2label))]


def test_seq_cls_new_head_trains_and_eval_accepts_it(tmp_path, rt):
    texts, labels = synthetic_sentiment(32)
    data = Data("s", "seq-cls", texts=texts, labels=labels)
    with pytest.raises(UserError, match="no trained sequence-classification head"):
        load_model("builtin:tiny-llama", task="seq-cls")  # evaluation still refuses a random head
    lm = load_for_training("builtin:tiny-llama", "seq-cls", data, rt)
    assert _labels(lm.model) == ["neg", "pos"] and lm.model.config.pad_token_id is not None
    ts = tokenize(data, lm.tokenizer, "seq-cls", 64, label_names=_labels(lm.model))
    cfg = TrainConfig.from_dict({"max_steps": 24, "optim": {"lr": 2e-3}, "batch": {"batch_size": 8, "max_length": 64},
                                 "early_stop": {"metric": "accuracy"}, "log": {"tensorboard": False}})
    r = train(lm.model, ts, cfg, rt, eval_data=ts, out_dir=tmp_path / "run")
    assert r.final_loss < r.losses[0] and r.eval["accuracy"] >= 0.9
    saved = load_model(str(tmp_path / "run"), task="seq-cls")  # what `lmslim eval DIR --task seq-cls` does
    assert classify(saved.model, saved.tokenizer, data)["accuracy"] == pytest.approx(r.eval["accuracy"])


def test_token_cls_trains_with_entity_f1(rt):
    words, tags = synthetic_ner(48)
    data = Data("n", "token-cls", tokens=words, tags=tags)
    lm = load_for_training("builtin:tiny-llama", "token-cls", data, rt)
    ts = tokenize(data, lm.tokenizer, "token-cls", 128, label_names=_labels(lm.model))
    before = token_classify(lm.model, lm.tokenizer, data)["micro"]["f1-score"]
    cfg = TrainConfig.from_dict({"max_steps": 30, "optim": {"lr": 3e-3}, "batch": {"batch_size": 8, "max_length": 128},
                                 "early_stop": {"metric": "f1"}})
    r = train(lm.model, ts, cfg, rt, eval_data=ts)
    assert {"eval_loss", "f1", "precision", "recall"} <= set(r.eval)
    assert r.eval["f1"] > max(0.5, before + 0.3)


def test_trained_head_with_other_labels_is_refused(tmp_path, rt):
    texts, labels = synthetic_sentiment(8)
    data = Data("s", "seq-cls", texts=texts, labels=labels)
    lm = load_for_training("builtin:tiny-llama", "seq-cls", data, rt)
    lm.model.save_pretrained(tmp_path / "clf")
    lm.tokenizer.save_pretrained(tmp_path / "clf")
    other = Data("s", "seq-cls", texts=texts, labels=["pos", "meh"] * 4)
    with pytest.raises(UserError, match=r"labels \['meh'\].*trained head"):
        load_for_training(str(tmp_path / "clf"), "seq-cls", other, rt)
    again = load_for_training(str(tmp_path / "clf"), "seq-cls", data, rt)  # same labels: head kept
    assert _labels(again.model) == ["neg", "pos"]


def test_from_config_trains_from_scratch(tmp_path, rt, docs):
    cfg_file = tmp_path / "llama.json"
    cfg_file.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "max_position_embeddings": 128}))
    lm = load_for_training(f"config:{cfg_file}", "clm", docs, rt)
    assert lm.model.config.num_hidden_layers == 1
    ts = tokenize(docs, lm.tokenizer, "clm", 64)
    r = train(lm.model, ts, TrainConfig.from_dict({"max_steps": 10, "optim": {"lr": 1e-2}}), rt)
    assert r.final_loss < r.losses[0]
    cfg_file.write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(UserError, match="vocab_size 10"):
        load_for_training(f"config:{cfg_file}", "clm", docs, rt)
    with pytest.raises(UserError, match="does not exist"):
        load_for_training(f"config:{tmp_path}/nope.json", "clm", docs, rt)
