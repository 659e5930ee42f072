"""Streaming perplexity (lmslim.measure.stream_eval): the same number as the in-memory path, one block resident."""

import json

import pytest
import torch

from lmslim.assets.tiny import build_tiny
from lmslim.cli.main import main
from lmslim.compress.quantize import GPTQConfig
from lmslim.compress.streaming import stream_compress
from lmslim.measure.eval import perplexity
from lmslim.measure.stream_eval import stream_perplexity
from lmslim.modelio import load_model

DOCS = ["The quick brown fox jumps over the lazy dog. " * 8, "A second document, shorter.",
        "Numbers 1 2 3 and symbols #!? also count as text to score. " * 5]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tiny-llama as sharded safetensors, and its GPTQ w4 version written by the streaming path."""
    model, tok = build_tiny("tiny-llama")
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "fp", max_shard_size="100KB")
    tok.save_pretrained(root / "fp")
    calib = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    stream_compress(root / "fp", "quantize", GPTQConfig(bits=4, group_size=32, batch_size=2), root / "q", calib)
    return root / "fp", root / "q"


@pytest.mark.parametrize("which", [0, 1], ids=["fp32", "gptq-w4"])
@pytest.mark.parametrize("window,stride,bound", [(32, 16, 0.01), (64, 64, 1024.0)])
def test_streamed_perplexity_equals_in_memory(folders, which, window, stride, bound):
    lm = load_model(str(folders[which]))
    want = perplexity(lm.model, lm.tokenizer, DOCS, window=window, stride=stride)
    got = stream_perplexity(folders[which], DOCS, window=window, stride=stride, max_activation_mb=bound)
    assert got["perplexity"] == want["perplexity"] and got["tokens_scored"] == want["tokens_scored"]
    assert got["windows"] == want["windows"]
    assert (got["streaming"]["spilled_mb"] > 0) == (bound < 1)  # the small bound sends windows to disk
    assert got["streaming"]["windows"] > 1


def test_eval_stream_flag(folders, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(DOCS))
    args = ["eval", str(folders[1]), "--data", str(data), "--window", "32", "--stride", "16"]
    assert main([*args, "--stream", "--max-activation-mb", "0.01", "--json", str(tmp_path / "s.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    s, m = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "sm")
    assert s["perplexity"] == m["perplexity"] and s["model"]["architecture"] == m["model"]["architecture"]


@pytest.mark.parametrize("extra", [["--task", "embed", "--stream"], ["--max-activation-mb", "5"]])
def test_eval_stream_refuses_what_it_does_not_do(folders, tmp_path, capsys, extra):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(DOCS))
    assert main(["eval", str(folders[0]), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "--stream" in err and len(err.splitlines()) == 1
