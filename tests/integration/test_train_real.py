"""Training on the real offline assets (tiny slices: a few steps, to stay within CI's time)."""

import json

import pytest

from lmslim.cli.main import main
from lmslim.modelio import load_model
from lmslim.data.spec import load_data
from lmslim.data.synthetic import synthetic_ner, to_conll
from lmslim.measure.eval import perplexity
from lmslim.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_smollm2_continued_pretraining_cli(tmp_path, capsys):
    """A few steps on one wiki paragraph lower SmolLM2's perplexity on it; `lmslim eval` accepts the result."""
    text = next(d for d in load_data("builtin:wiki:train").documents if len(d) > 2000)[:1500]
    (tmp_path / "para.txt").write_text(text)
    base = load_model("builtin:smollm2-135m")
    before = perplexity(base.model, base.tokenizer, [text], window=128, stride=128)["perplexity"]
    del base
    out = tmp_path / "run"
    code = main(["train", "builtin:smollm2-135m", "--data", str(tmp_path / "para.txt"), "--out", str(out),
                 "--max-steps", "4", "optim.lr=1e-4", "schedule.name=constant", "batch.max_length=128",
                 "batch.batch_size=2", "log.every_steps=1"])
    err = capsys.readouterr().err
    assert code == 0, err
    recs = read_metrics(out / "metrics.jsonl")
    assert len(recs) == 4 and all(r["tokens_per_s"] > 0 for r in recs)
    code = main(["eval", str(out), "--data", str(tmp_path / "para.txt"), "--window", "128", "--stride", "128",
                 "--json", str(tmp_path / "eval.json")])
    assert code == 0, capsys.readouterr().err
    after = json.loads((tmp_path / "eval.json").read_text())["perplexity"]
    assert after < before


def test_minilm_token_classification_new_head(tmp_path, capsys):
    """A real BERT encoder gets a new NER head; evaluation uses the entity-level report."""
    words, tags = synthetic_ner(64)
    (tmp_path / "ner.conll").write_text(to_conll(words, tags))
    out = tmp_path / "ner"
    code = main(["train", "builtin:minilm-l6", "--task", "token-cls", "--data", str(tmp_path / "ner.conll"),
                 "--eval-data", str(tmp_path / "ner.conll"), "--out", str(out), "--max-steps", "24",
                 "optim.lr=5e-4", "batch.batch_size=16", "early_stop.metric=f1", "eval.every_steps=12"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "train_result.json").read_text())
    assert result["eval"]["f1"] > 0.5
    assert main(["eval", str(out), "--task", "token-cls", "--data", str(tmp_path / "ner.conll")]) == 0
