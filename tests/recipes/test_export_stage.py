"""The export stage: a recipe's last stage writes a GGUF file or an ONNX folder and measures it in its engine.

Runs the real engines (llama.cpp, ONNX Runtime); skipped only when they are not installed and
LMSLIM_REQUIRE_ENGINES is unset (CI sets it).
"""

import json

import pytest

from lmslim.compress.export import ExportConfig
from lmslim.core.errors import UserError
from lmslim.cli.main import main
from tests.recipes.test_run import write_recipe

from tests.engines import require_engines  # noqa: E402

require_engines("llama_cpp", "onnxruntime")

EXPORTS = {
    "gguf": ({"format": "gguf", "type": "q8_0", "tensor_types": ["blk.*.ffn_down.weight=f16"]}, "model.gguf",
             "llama.cpp"),
    "onnx": ({"format": "onnx", "type": "int4", "group_size": 16}, "model-onnx", "onnxruntime"),
}


@pytest.mark.parametrize("fmt", sorted(EXPORTS))
def test_export_stage_is_measured_in_its_engine(tmp_path, text_file, capsys, fmt):
    options, artifact, engine = EXPORTS[fmt]
    recipe = write_recipe(tmp_path / "r.yaml", text_file,
                          [{"prune": {"method": "magnitude", "sparsity": 0.3}}, {"export": options}], measure=True)
    out = tmp_path / "out"
    assert main(["compress", "builtin:tiny-llama", "--recipe", str(recipe), "--out", str(out),
                 "keep_intermediate=true"]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    base, pruned, exported = res["variants"]
    assert exported["stage"] == "export" and exported["model"] == artifact and (out / artifact).exists()
    assert (out / "model" / "config.json").is_file()  # the model the export was made from, beside it
    # ... which is the pruned stage's folder, hard-linked rather than written again
    weights = out / "model" / "model.safetensors"
    assert weights.stat().st_ino == (out / "stages" / "00-prune" / "model" / "model.safetensors").stat().st_ino
    for kind in ("eval", "bench"):
        assert base[kind]["engine"]["name"] == "torch" and exported[kind]["engine"]["name"] == engine
    # same token windows in every engine; the 8-bit/4-bit export stays near the pruned model it was made from
    assert exported["eval"]["tokens_scored"] == pruned["eval"]["tokens_scored"]
    assert abs(exported["eval"]["perplexity"] / pruned["eval"]["perplexity"] - 1) < 0.05
    assert exported["bench"]["size_mb"] < pruned["bench"]["size_mb"]
    assert exported["weights_sha256"] not in (base["weights_sha256"], pruned["weights_sha256"])


@pytest.mark.parametrize("options,message", [
    ({"format": "onnx", "embed_type": "q8_0"}, "export format onnx does not take embed_type"),
    ({"format": "hf", "type": "q4_0"}, "takes no type"),
    ({"format": "gguf", "type": "q9_9"}, "q9_9"),
    ({"format": "tflite"}, "unknown export format"),
    ({"format": "onnx", "method": "gptq"}, "quantize the model with lmslim quantize first"),
    ({"format": "gguf", "tensor_types": ["blk.*"]}, "GLOB=TYPE"),
    ({"format": "onnx", "importance": True}, "export format onnx does not take importance"),
])
def test_bad_export_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        ExportConfig(**options)


def test_importance_weights_the_rounding_with_calibration_statistics(tmp_path):
    """importance: true computes E[x²] per column on the calibration ids; the rounding it steers differs."""
    import torch

    from lmslim.compress.export import export_
    from lmslim.modelio import load_model

    cfg = dict(format="gguf", type="q4_0", tensor_types=("blk.*.ffn_down.weight=f16",))
    assert ExportConfig(**cfg, importance=True).needs_calibration and not ExportConfig(**cfg).needs_calibration
    ids = torch.randint(10, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    files = {}
    for imp in (False, True):
        lm = load_model("builtin:tiny-llama")
        files[imp] = tmp_path / f"{imp}.gguf"
        export_(lm.model, lm.tokenizer, ExportConfig(**cfg, importance=imp), files[imp], ids if imp else None)
    assert files[True].read_bytes() != files[False].read_bytes()
    with pytest.raises(UserError, match="needs calibration"):
        export_(lm.model, lm.tokenizer, ExportConfig(**cfg, importance=True), tmp_path / "x.gguf")


def test_hf_export_accepts_options_left_at_their_defaults():
    """``importance: false`` or ``clip_search: false`` say nothing for hf; a real option is still refused."""
    assert ExportConfig(format="hf", importance=False, clip_search=False).format == "hf"
    with pytest.raises(UserError, match="takes no method"):
        ExportConfig(format="hf", method="gptq")
