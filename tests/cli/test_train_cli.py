import json

import pytest

from lmslim.cli.main import main
from lmslim.data.synthetic import synthetic_ner, synthetic_sentiment, to_conll
from lmslim.train.metrics import read_metrics


def run(capsys, *args):
    code = main([str(a) for a in args])
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "text.txt").write_text("The cat sat on the mat and looked at the dog. " * 60)
    texts, labels = synthetic_sentiment(16)
    (tmp_path / "sent.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    words, tags = synthetic_ner(16)
    (tmp_path / "ner.conll").write_text(to_conll(words, tags))
    (tmp_path / "notbio.jsonl").write_text(json.dumps({"tokens": ["Ann", "runs"], "tags": ["PER", "O"]}) + "\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    return tmp_path


FAST = ["batch.max_length=32", "batch.batch_size=4", "log.every_steps=1"]


@pytest.mark.parametrize("args,message", [
    (["--out", "{full}"], "already exists and is not empty"),
    (["--out", "{new}", "--resume"], "nothing to resume"),
    (["--out", "{full}", "--resume", "--overwrite"], "pass only one"),
    (["--out", "{new}", "batch.grad_acum=2"], "did you mean 'batch.grad_accum'"),
    (["--out", "{new}", "optim.lr=-1"], "optim.lr must be > 0"),
    (["--out", "{new}", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["--out", "{new}", "--config", "{d}/missing.yaml"], "does not exist"),
    (["--out", "{new}", "--task", "embed"], "cannot train task 'embed'"),
    (["--out", "{d}/afile/sub"], "is a file, not a folder"),
    (["--out", "{new}", "--task", "seq-cls", "--data", "{d}/text.txt"], "expected '__label__"),
    (["--out", "{new}", "--task", "token-cls", "--data", "{d}/notbio.jsonl"], "not BIO tags"),
    (["--out", "{new}", "--task", "seq-cls", "--data", "{d}/sent.jsonl", "--eval-data", "{d}/notbio.jsonl"],
     "no text column"),
    (["--out", "{new}", "early_stop.metric=accuracy", "--eval-data", "{d}/text.txt"], "is not measured for task clm"),
])
def test_train_bad_input(files, capsys, args, message):
    args = [a.format(full=files / "full", new=files / "new", d=files) for a in args]
    if "--data" not in args:
        args += ["--data", str(files / "text.txt")]
    code, _, err = run(capsys, "train", "builtin:tiny-llama", *args, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (files / "new").exists()  # nothing written
    assert [p.name for p in (files / "full").iterdir()] == ["keep.txt"]


def test_train_eval_resume_cli(files, capsys):
    out = files / "run"
    code, stdout, err = run(capsys, "train", "builtin:tiny-llama", "--data", files / "text.txt", "--out", out,
                            "--max-steps", 4, "checkpoint.every_steps=2", "optim.lr=1e-3", *FAST)
    assert code == 0, err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs)
    code, stdout, err = run(capsys, "eval", out, "--data", files / "text.txt", "--window", 32, "--stride", 32)
    assert code == 0 and "perplexity" in stdout, err
    # Continue the same run to 6 steps: only the run length changes.
    code, _, err = run(capsys, "train", "builtin:tiny-llama", "--data", files / "text.txt", "--out", out,
                       "--max-steps", 6, "--resume", "checkpoint.every_steps=2", "optim.lr=1e-3", *FAST)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # Resuming with another model is refused before anything changes.
    before = (out / "metrics.jsonl").read_text()
    code, _, err = run(capsys, "train", "builtin:tiny-gpt2", "--data", files / "text.txt", "--out", out,
                       "--resume", "checkpoint.every_steps=2", "optim.lr=1e-3", *FAST)
    assert code == 2 and "another model" in err, err
    assert (out / "metrics.jsonl").read_text() == before
    # --overwrite starts again.
    code, _, err = run(capsys, "train", "builtin:tiny-llama", "--data", files / "text.txt", "--out", out,
                       "--max-steps", 2, "--overwrite", *FAST)
    assert code == 0 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_train_nan_loss_cli(files, capsys):
    out = files / "nan"
    code, _, err = run(capsys, "train", "builtin:tiny-llama", "--data", files / "text.txt", "--out", out,
                       "--max-steps", 30, "optim.lr=1e12", "optim.grad_clip=0", "schedule.name=constant",
                       "checkpoint.every_steps=1", *FAST)
    last = err.strip().splitlines()[-1]  # progress lines may come first when stderr is not a terminal
    assert code == 2 and last.startswith("error: training diverged at step 1") and "no good checkpoint" in last, err
    # the step-1 weights are already ~1e12: nothing is kept, and the unfinished start is removed
    assert not out.exists()


def test_train_resume_changes_cli(files, capsys):
    out = files / "lr"
    args = ["train", "builtin:tiny-llama", "--data", files / "text.txt", "--out", out, *FAST,
            "checkpoint.every_steps=2", "schedule.name=constant"]
    assert run(capsys, *args, "--max-steps", 2)[0] == 0
    code, _, err = run(capsys, *args, "--max-steps", 4, "--resume", "optim.lr=1e-4")
    assert code == 2 and "--resume-changes optim.lr" in err.strip().splitlines()[-1], err
    code, _, err = run(capsys, *args, "--max-steps", 4, "--resume", "optim.lr=1e-4", "--resume-changes", "optim.lr")
    assert code == 0, err
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert lrs[-1] == pytest.approx(1e-4) and lrs[0] != pytest.approx(1e-4)


@pytest.mark.parametrize("task,data,extra", [
    ("seq-cls", "sent.jsonl", ["early_stop.metric=accuracy"]),
    ("token-cls", "ner.conll", ["early_stop.metric=f1"]),
])
def test_train_classification_cli(files, capsys, task, data, extra):
    out = files / task
    code, stdout, err = run(capsys, "train", "builtin:tiny-bert", "--task", task, "--data", files / data,
                            "--eval-data", files / data, "--out", out, "--max-steps", 3, *FAST, *extra)
    assert code == 0, err
    code, stdout, err = run(capsys, "eval", out, "--task", task, "--data", files / data)
    assert code == 0, err
