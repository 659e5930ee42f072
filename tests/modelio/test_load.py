import json

import pytest
import torch

from lmslim.assets.tiny import build_tiny, byte_tokenizer
from lmslim.modelio import spec as models
from lmslim.core.errors import UserError
from lmslim.modelio import load_model, resolve
from lmslim.modelio.spec import check_safetensors


@pytest.mark.parametrize("name,task,arch", [("tiny-llama", "clm", "LlamaForCausalLM"),
                                            ("tiny-gpt2", "clm", "GPT2LMHeadModel"),
                                            ("tiny-bert", "embed", "BertModel")])
def test_builtin_tiny_models_load(name, task, arch):
    lm = load_model(f"builtin:{name}", task=task)
    assert type(lm.model).__name__ == arch
    assert lm.resolved.size_bytes() > 0
    assert len(lm.resolved.weights_hash()) == 64
    assert not lm.model.training


def test_tiny_models_are_seeded():
    a, _ = build_tiny("tiny-llama")
    b, _ = build_tiny("tiny-llama")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_byte_tokenizer_is_lossless():
    tok = byte_tokenizer()
    text = "Zürich — 東京 🙂 tabs\tand\nnewlines"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_missing_path():
    with pytest.raises(UserError, match="does not exist"):
        resolve("./no/such/model")


def test_unknown_builtin():
    with pytest.raises(UserError, match="unknown builtin model 'gpt5'"):
        resolve("builtin:gpt5")


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        resolve(str(tmp_path))


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no weights"):
        resolve(str(tmp_path))


def _saved_tiny(tmp_path):
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_truncated_safetensors(tmp_path):
    st = _saved_tiny(tmp_path)
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        resolve(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    st = _saved_tiny(tmp_path)
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 100)
    with pytest.raises(UserError, match="not a valid safetensors"):
        check_safetensors(st)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(UserError, match="hub cannot be reached"):
        resolve("HuggingFaceTB/SmolLM2-135M")


def test_encoder_cannot_do_clm():
    with pytest.raises(UserError, match="cannot do task clm"):
        load_model("builtin:tiny-bert", task="clm")


def test_causal_lm_without_classification_head():
    with pytest.raises(UserError, match="no trained sequence-classification head"):
        load_model("builtin:tiny-llama", task="seq-cls")


def test_unknown_task():
    with pytest.raises(UserError, match="unknown task"):
        load_model("builtin:tiny-llama", task="translate")
