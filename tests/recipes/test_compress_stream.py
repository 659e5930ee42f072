"""``lmslim compress --stream``: a recipe run one block at a time gives the in-memory run's weights and numbers."""

import json

import pytest
import torch
import yaml

from lmslim.assets.tiny import build_tiny
from lmslim.cli.main import main
from lmslim.core.io import sha256_files
from lmslim.modelio import load_model
from lmslim.nn.quant_linear import QuantLinear

STAGES = [{"prune": {"method": "wanda", "sparsity": 0.5, "calib_samples": 4, "seq_len": 32, "batch_size": 2}},
          {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "seq_len": 32,
                        "batch_size": 2}}]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """tiny-llama as several safetensors shards with an index, as large models are stored."""
    model, tok = build_tiny("tiny-llama")
    folder = tmp_path_factory.mktemp("src") / "tiny"
    model.save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    return folder


def _recipe(path, text_file, stages, task="clm"):
    raw = {"data": {"calibration": str(text_file), "eval": str(text_file)}, "stages": stages,
           "eval": {"enabled": True, "task": task, "max_tokens": 400, "window": 64, "stride": 32},
           "bench": {"enabled": True, "prompt_len": 8, "gen_len": 4, "repeats": 1, "warmup": 0}}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_streamed_recipe_gives_the_in_memory_weights_and_perplexity(sharded, tmp_path, text_file, capsys):
    recipe = _recipe(tmp_path / "r.yaml", text_file, STAGES)
    before = sha256_files(list(sharded.glob("*.safetensors")))
    streamed, in_memory = tmp_path / "s", tmp_path / "m"
    assert main(["compress", str(sharded), "--recipe", str(recipe), "--out", str(streamed), "--stream",
                 "--max-activation-mb", "0.05"]) == 0, capsys.readouterr().err
    assert main(["compress", str(sharded), "--recipe", str(recipe), "--out", str(in_memory)]) == 0
    assert "--stream: bench not measured" in capsys.readouterr().out
    s, m = (json.loads((d / "results.json").read_text()) for d in (streamed, in_memory))
    assert [v["stage"] for v in s["variants"]] == [v["stage"] for v in m["variants"]] == [None, "prune", "quantize"]
    for a, b in zip(s["variants"], m["variants"]):  # every variant's perplexity, exactly
        assert a["eval"]["perplexity"] == b["eval"]["perplexity"] and a["eval"]["tokens_scored"] == 399
        assert a["bench"] is None and b["bench"]["decode_tokens_per_s"] > 0
    assert s["stream"]["bench"].startswith("not measured") and "stream" not in m
    assert s["variants"][1]["stage_report"]["streaming"]["spilled_mb"] > 0  # the bound sent activations to disk
    got, want = load_model(str(streamed / "model")).model, load_model(str(in_memory / "model")).model
    quant = {n: q for n, q in want.named_modules() if isinstance(q, QuantLinear)}
    assert len(quant) == 14
    for name, q in quant.items():
        g = got.get_submodule(name)
        assert torch.equal(q.codes(), g.codes()) and torch.equal(q.scale, g.scale), name
    assert (streamed / "model" / "model.safetensors.index.json").is_file()  # written block by block
    assert sha256_files(list(sharded.glob("*.safetensors"))) == before


@pytest.mark.parametrize("stages,task,message", [
    ([{"prune": {"method": "magnitude", "sparsity": 0.5}}], "clm", "stages.0: prune magnitude cannot stream yet"),
    ([{"prune": {"method": "heads", "fraction": 0.5}}], "clm", "stages.0: prune heads cannot stream yet"),
    ([STAGES[1], "export"], "clm", "stages.1: stage export cannot stream"),
    ([STAGES[1]], "embed", "--stream measures perplexity (eval.task clm)"),
])
def test_recipes_stream_cannot_run_are_refused_in_one_line(sharded, tmp_path, text_file, capsys, stages, task,
                                                           message):
    recipe = _recipe(tmp_path / "r.yaml", text_file, stages, task)
    out = tmp_path / "out"
    assert main(["compress", str(sharded), "--recipe", str(recipe), "--out", str(out), "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_max_activation_bound_needs_stream(sharded, tmp_path, text_file, capsys):
    recipe = _recipe(tmp_path / "r.yaml", text_file, STAGES[1:])
    out = tmp_path / "out"
    for extra in (["--max-activation-mb", "10"], ["--stream", "--max-activation-mb", "0"]):
        assert main(["compress", str(sharded), "--recipe", str(recipe), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "applies to --stream runs only" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
