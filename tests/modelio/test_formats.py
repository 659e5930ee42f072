"""Every output kind: saved with save_model, loaded by plain transformers and by lmslim, same numbers.

Tolerances (logits of 2 x 24 tokens, |logits| ~ 1 on the tiny models):

- dense, pruned, shared-free and symmetric quantized folders: plain transformers and lmslim give
  identical logits (``torch.equal``): the weights are the same fp32 numbers;
- asymmetric quantized folders (compressed-tensors ``int-quantized``): transformers computes
  ``(c - z) * scale``, lmslim ``c * scale + fp16(-z * scale)``; each weight differs by at most half
  an fp16 ulp of the offset (checked directly), logits by at most ``ASYM_ATOL`` = 2e-3;
- lmslim's own reload is always bit-identical to the model before saving (codes and logits).
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lmslim.assets.tiny import build_tiny
from lmslim.compress.prune import HeadsConfig, LayersConfig, MagnitudeConfig, NeuronsConfig, WandaConfig, prune_
from lmslim.compress.quantize import AWQConfig, DynamicInt8Config, GPTQConfig, RTNConfig, quantize_
from lmslim.compress.share import ShareConfig, share_
from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.modelio.formats import save_config_and_tokenizer, save_model, unique_state_dict
from lmslim.modelio.formats.lmslim_sparse import save_pruned
from lmslim.nn.quant_linear import QuantLinear

ASYM_ATOL = 2e-3
CALIB = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(10, 200, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _save(model, tok, tmp_path, **kw):
    folder = tmp_path / "out"
    folder.mkdir()
    return save_model(model, tok, folder, **kw), folder


def _plain(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _dequant_kernels(model):
    """Switch int8 kernels to the exact weight-only path, the numbers plain transformers computes."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel != "dequant":
            m.kernel = "dequant"
            m.prepare()
    return model


def _quant_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---- dense and pruned: ordinary folders every tool reads ------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_dense_folder_is_plain(tmp_path, name):
    model, tok = build_tiny(name)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "hf"
    assert torch.equal(_logits(_plain(folder)), _logits(load_model(str(folder)).model))
    assert torch.equal(_logits(_plain(folder)), _logits(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_uniform_structured_folder_is_plain(tmp_path, name):
    model, tok = build_tiny(name)
    prune_(model, NeuronsConfig(fraction=0.25), CALIB)
    prune_(model, LayersConfig(drop=1), CALIB)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "hf"
    plain = _plain(folder)
    assert plain.config.num_hidden_layers == 1 if name == "tiny-llama" else plain.config.n_layer == 1
    assert torch.equal(_logits(plain), _logits(load_model(str(folder)).model))
    assert torch.equal(_logits(plain), _logits(model))


@pytest.mark.parametrize("cfg,pattern", [(MagnitudeConfig(sparsity=0.5), None), (WandaConfig(sparsity=0.6), None),
                                         (MagnitudeConfig(n_m="2:4"), (2, 4))])
def test_unstructured_and_2_4_folders_are_plain_with_zeros_kept(tmp_path, cfg, pattern):
    model, tok = build_tiny("tiny-llama")
    prune_(model, cfg, CALIB)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "hf"
    plain = _plain(folder)
    w = plain.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, model.model.layers[0].mlp.up_proj.weight)
    assert (w == 0).float().mean() >= 0.49
    if pattern:
        assert bool(((w.reshape(-1, 4) != 0).sum(1) <= 2).all())  # every 4 consecutive weights keep at most 2
    assert torch.equal(_logits(plain), _logits(load_model(str(folder)).model))
    assert torch.equal(_logits(plain), _logits(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_per_layer_structured_folder_refuses_plain_transformers(tmp_path, name):
    model, tok = build_tiny(name)
    prune_(model, NeuronsConfig(fraction=0.3, scope="global"), CALIB)
    prune_(model, HeadsConfig(fraction=0.25, scope="global"), CALIB)
    assert model.config.lmslim_structure["layers"][0] != model.config.lmslim_structure["layers"][1]
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "lmslim-sparse"
    with pytest.raises(ValueError, match=r"lmslim-only \(per-layer pruned shapes\); load it with lmslim"):
        _plain(folder)
    assert torch.equal(_logits(load_model(str(folder)).model), _logits(model))


def test_shared_folder_refuses_plain_transformers(tmp_path):
    model, tok = build_tiny("tiny-llama")
    share_(model, ShareConfig(group_size=2))
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "lmslim-shared"
    with pytest.raises(ValueError, match=r"lmslim-only \(cross-layer weight sharing\)"):
        _plain(folder)
    lm = load_model(str(folder))
    assert torch.equal(_logits(lm.model), _logits(model))
    layers = lm.model.model.layers
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # still shared, not two copies


# ---- quantized: compressed-tensors ----------------------------------------------------------------------


QUANT_CASES = {
    "rtn-int4-asym": (RTNConfig(bits=4, group_size=32, kernel="dequant"), False),
    "rtn-int4-sym-partial-group": (RTNConfig(bits=4, group_size=48, symmetric=True, kernel="dequant"), False),
    "rtn-int8-channel": (RTNConfig(bits=8, group_size=None, symmetric=True, kernel="dequant"), False),
    "rtn-int8-asym": (RTNConfig(bits=8, group_size=None, kernel="int8"), False),
    "dynamic-int8": (DynamicInt8Config(), False),
    "gptq-int4": (GPTQConfig(bits=4, group_size=32, kernel="dequant"), True),
    "awq-int4": (AWQConfig(bits=4, group_size=32, kernel="dequant"), True),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_folder_loads_in_plain_transformers(tmp_path, case):
    cfg, calibrated = QUANT_CASES[case]
    model, tok = build_tiny("tiny-llama")
    quantize_(model, cfg, CALIB if calibrated else None)
    before = _logits(model)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "compressed-tensors"
    data = json.loads((folder / "config.json").read_text())
    assert data["quantization_config"]["quant_method"] == "compressed-tensors"
    assert data["lmslim_quantization"]["method"] == model.config.lmslim_quantization["method"]

    lm = load_model(str(folder))
    for name, m in _quant_modules(model).items():  # lmslim: bit-identical codes and grid, same kernel
        r = lm.model.get_submodule(name)
        assert isinstance(r, QuantLinear) and r.kernel == m.kernel and r.scheme == m.scheme
        assert torch.equal(r.qweight, m.qweight) and torch.equal(r.scale, m.scale) and torch.equal(r.offset, m.offset)
    assert torch.equal(_logits(lm.model), before)

    plain = _plain(folder)
    plain_logits = _logits(plain)  # compressed-tensors decompresses the weights on the first forward pass
    symmetric = all(m.scheme.symmetric for m in _quant_modules(model).values())
    for name, m in _quant_modules(lm.model).items():
        w_plain, w_ours = plain.get_submodule(name).weight.detach(), m.dequantized_weight()
        bound = 0 if symmetric else (m.offset.float().abs().max() * 2.0 ** -11).item()
        assert (w_plain - w_ours).abs().max().item() <= bound, name
    ours = _logits(_dequant_kernels(lm.model))
    if symmetric:
        assert torch.equal(plain_logits, ours)
    else:
        assert (plain_logits - ours).abs().max().item() <= ASYM_ATOL


def test_quantized_and_pruned_folder_keeps_zeros_in_plain_transformers(tmp_path):
    model, tok = build_tiny("tiny-llama")
    prune_(model, WandaConfig(sparsity=0.5), CALIB)
    quantize_(model, RTNConfig(bits=4, group_size=32, symmetric=True, kernel="dequant"))
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "compressed-tensors"
    plain, lm = _plain(folder), load_model(str(folder))
    assert json.loads((folder / "config.json").read_text())["lmslim_pruning"]
    assert torch.equal(_logits(plain), _logits(lm.model))
    assert torch.equal(_logits(lm.model), _logits(model))
    w = plain.model.layers[0].mlp.up_proj.weight
    assert (w == 0).float().mean() >= 0.49  # the symmetric grid holds 0 exactly: pruned weights stay zero


@pytest.mark.parametrize("name,cfg,why", [
    ("tiny-gpt2", RTNConfig(bits=4, group_size=32, kernel="dequant"), "GPT-2's Conv1D layers"),
    ("tiny-llama", RTNConfig(bits=4, group_size=32, minmax=True, kernel="dequant"), "non-integer zero points"),
])
def test_quantized_folder_without_standard_form_refuses_plain_transformers(tmp_path, name, cfg, why):
    model, tok = build_tiny(name)
    quantize_(model, cfg)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "lmslim-quantized", why
    with pytest.raises(ValueError, match=r"lmslim-only \(quantized layers compressed-tensors cannot express\)"):
        _plain(folder)
    assert torch.equal(_logits(load_model(str(folder)).model), _logits(model))


# ---- folders of earlier lmslim versions -----------------------------------------------------------------


def test_old_quantized_folder_still_loads(tmp_path):
    model, tok = build_tiny("tiny-llama")
    quantize_(model, RTNConfig(bits=4, group_size=32, kernel="dequant"))
    save_config_and_tokenizer(model, tok, tmp_path)  # what lmslim wrote before: format 2, no refusal
    save_file(unique_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["lmslim_quantization"]["format"] == 2
    assert torch.equal(_logits(load_model(str(tmp_path)).model), _logits(model))


def test_old_bitmask_folder_still_loads(tmp_path):
    model, tok = build_tiny("tiny-llama")
    prune_(model, MagnitudeConfig(sparsity=0.5), CALIB)
    assert save_pruned(model, tok, tmp_path)["compressed_tensors"] > 0  # lmslim_sparsity format 1
    assert torch.equal(_logits(load_model(str(tmp_path)).model), _logits(model))


def test_unknown_record_format_says_how_to_rebuild(tmp_path):
    model, tok = build_tiny("tiny-llama")
    quantize_(model, RTNConfig(bits=4, group_size=32, kernel="dequant"))
    save_config_and_tokenizer(model, tok, tmp_path)
    save_file(unique_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((tmp_path / "config.json").read_text())
    data["lmslim_quantization"]["format"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="quantize the original model again"):
        load_model(str(tmp_path))


def test_damaged_compressed_folder_is_an_error_not_random_weights(tmp_path):
    from safetensors.torch import load_file

    model, tok = build_tiny("tiny-llama")
    quantize_(model, RTNConfig(bits=4, group_size=32, symmetric=True, kernel="dequant"))
    _, folder = _save(model, tok, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="missing.*model.norm.weight"):
        load_model(str(folder))


# ---- SmolLM2 --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_quantized_and_sparse_folders_load_in_plain_transformers(tmp_path):
    # w4 g128 symmetric: not SmolLM2's own Q4_1 grid (g32 asymmetric), and its 576-wide rows end in
    # a 64-column partial group, written as groups of gcd(128, 576) = 64.
    ids = torch.randint(100, 40000, (1, 32), generator=torch.Generator().manual_seed(2))
    for kind in ("int4", "sparse"):
        lm = load_model("builtin:smollm2-135m")
        if kind == "int4":
            # Four blocks (28 matrices) keep the test short; every SmolLM2 matrix shape is among them.
            report = quantize_(lm.model, RTNConfig(bits=4, group_size=128, symmetric=True, kernel="dequant",
                                                   targets=("model.layers.[0-3].*",)))
            assert report["modules"] == 28
        else:
            prune_(lm.model, MagnitudeConfig(sparsity=0.5))
        with torch.no_grad():
            before = lm.model(input_ids=ids).logits
        folder = tmp_path / kind
        folder.mkdir()
        assert save_model(lm.model, lm.tokenizer, folder) == ("compressed-tensors" if kind == "int4" else "hf")
        del lm
        with torch.no_grad():
            ours = load_model(str(folder)).model(input_ids=ids).logits
            plain = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
        assert torch.equal(ours, before)
        assert torch.equal(plain, ours)


def test_format_order_does_not_depend_on_import_order():
    import subprocess
    import sys

    code = ("import lmslim.modelio.formats.lmslim_sparse, lmslim.modelio.formats.lmslim_quantized\n"
            "from lmslim.modelio.formats import registered_formats\n"
            "print([f.name for f in registered_formats()][:4])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['compressed-tensors', 'lmslim-quantized', 'lmslim-shared', 'lmslim-sparse']"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [64, 40, 13])  # whole words, a padded last word, rows that end mid-byte
def test_packed_words_read_as_lmslim_codes_without_unpacking(bits, k):
    """compressed-tensors' own packer -> lmslim's packed codes, on the fast byte path and the fallback alike."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lmslim.modelio.formats.compressed_tensors import _packed_codes
    from lmslim.nn.scheme import pack

    codes = torch.randint(0, 2 ** bits, (6, k), generator=torch.Generator().manual_seed(bits * k), dtype=torch.int16)
    words = pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(_packed_codes(words, bits, 6, k), pack(codes.to(torch.uint8), bits))


def test_loading_does_not_rebuild_loaded_layers_kernels(tmp_path, monkeypatch):
    """fill's load_state_dict must not re-prepare QuantLinear layers it does not load (a second kernel copy each)."""
    model, tok = build_tiny("tiny-llama")
    quantize_(model, DynamicInt8Config(kernel="fbgemm"))
    _, folder = _save(model, tok, tmp_path)
    calls = []
    original = QuantLinear.prepare
    monkeypatch.setattr(QuantLinear, "prepare", lambda self: (calls.append(self), original(self)))
    loaded = load_model(str(folder)).model
    quant = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(calls) == len(quant) and {id(m) for m in calls} == {id(m) for m in quant}


# ---- quantized embedding tables ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,calibrated", [
    (RTNConfig(bits=4, group_size=16, include_embeddings=True, kernel="dequant"), False),
    (GPTQConfig(bits=4, group_size=16, include_embeddings=True, include_lm_head=True, kernel="dequant"), True),
    (DynamicInt8Config(include_embeddings=True, kernel="fbgemm"), False),
])
def test_tied_quantized_embedding_is_stored_once_and_refuses_plain_transformers(tmp_path, cfg, calibrated):
    from lmslim.nn.quant_embedding import QuantEmbedding

    model, tok = build_tiny("tiny-llama")
    assert model.config.tie_word_embeddings
    quantize_(model, cfg, CALIB if calibrated else None)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and head.qweight is emb.qweight
    before = _logits(model)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "lmslim-quantized"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head.")]  # the table once, under the embedding
    lm = load_model(str(folder)).model
    assert lm.get_output_embeddings().qweight is lm.get_input_embeddings().qweight
    assert torch.equal(_logits(lm), before)
    with pytest.raises(Exception, match="lmslim"):
        _plain(folder)


@pytest.mark.parametrize("symmetric", [True, False])
def test_untied_quantized_embedding_loads_in_plain_transformers(tmp_path, symmetric):
    from lmslim.compress.quantize.api import untie_lm_head

    model, tok = build_tiny("tiny-llama")
    untie_lm_head(model)
    quantize_(model, RTNConfig(bits=4, group_size=16, symmetric=symmetric, include_embeddings=True,
                               include_lm_head=True, kernel="dequant"))
    before = _logits(model)
    fmt, folder = _save(model, tok, tmp_path)
    assert fmt == "compressed-tensors"
    lm = load_model(str(folder)).model
    assert torch.equal(_logits(lm), before)
    plain = _plain(folder)
    plain_logits = _logits(plain)
    w_plain = plain.get_input_embeddings().weight.detach()
    ours = lm.get_input_embeddings()
    bound = 0 if symmetric else (ours.offset.float().abs().max() * 2.0 ** -11).item()
    assert (w_plain - ours.dequantized_weight()).abs().max().item() <= bound
    assert (plain_logits - before).abs().max().item() <= (0 if symmetric else ASYM_ATOL)
