import json

import pytest
import torch
from safetensors.torch import load_file

from lmslim.cli.main import main


def run(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress bars)
    code = main([str(a) for a in args])
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("Distillation moves knowledge from a teacher to a student. " * 60)
    return p


@pytest.fixture
def other_vocab_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmslim.assets.tiny import byte_tokenizer

    tok = byte_tokenizer("bert")  # 261 tokens, different ids
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    folder = tmp_path / "other"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _bad_cases(tmp_path, other):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"vocab_size": 300}))
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    return [
        (["--student-layers", "2", "--alpha", "1.5"], None, "--alpha must be in [0, 1]"),
        (["--student-layers", "2", "--alpha", "-0.1"], None, "--alpha must be in [0, 1]"),
        (["--student-layers", "2", "--temperature", "0"], None, "--temperature must be > 0"),
        (["--student-layers", "2", "--temperature", "-2"], None, "--temperature must be > 0"),
        (["--student", str(other)], None, "vocabulary mismatch"),
        (["--student-config", str(cfg)], None, "vocabulary mismatch"),
        (["--student-layers", "2"], existing, "already exists"),
        ([], None, "exactly one of"),
        (["--student-layers", "2", "--student", str(other)], None, "exactly one of"),
        (["--student-layers", "9"], None, "keep one layer in k"),
        (["--student-layers", "0,7"], None, "outside the teacher's layers"),
        (["--student-layers", "2", "--hidden-loss", "l1"], None, "--hidden-loss must be mse or cosine"),
        (["--student-layers", "2", "optim.lrr=1"], None, "unknown config key"),
        (["--student-layers", "2", "--max-steps", "-1"], None, "--max-steps must be >= 0"),
    ]


def test_distill_bad_input(tmp_path, capsys, text, other_vocab_model):
    for extra, out, message in _bad_cases(tmp_path, other_vocab_model):
        target = out or tmp_path / "student"
        before = sorted(p.name for p in tmp_path.iterdir())
        steps = [] if "--max-steps" in extra else ["--max-steps", "1"]
        code, _, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--data", text, "--out", target,
                           *steps, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, extra  # nothing written, no temp dirs
        if out is not None:
            assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_share_bad_input(tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    for extra, message in [(["--group-size", "1"], "--group-size must be an integer >= 2"),
                           (["--group-size", "3"], "fewer than --group-size 3"),
                           (["--group-size", "2", "--init", "median"], "--init must be one of"),
                           (["--group-size", "2", "--out", str(existing)], "already exists")]:
        args = ["share", "builtin:tiny-llama", *extra]
        if "--out" not in extra:
            args += ["--out", str(tmp_path / "shared")]
        code, _, err = run(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_distill_untrained_then_trained_then_shared(tmp_path, capsys, text):
    from lmslim.modelio import load_model

    base = tmp_path / "untrained"
    code, stdout, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--student-layers", "1",
                            "--data", text, "--out", base, "--max-steps", "0")
    assert code == 0, err
    summary = json.loads((base / "lmslim_distill.json").read_text())
    assert summary["train"] is None and summary["student"]["kept"] == [0, 1]
    teacher = load_model("builtin:tiny-llama").model
    untrained = load_model(str(base)).model
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), untrained.state_dict().values()))

    trained = tmp_path / "kd"
    code, stdout, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--student-layers", "2",
                            "--data", text, "--out", trained, "--max-steps", "2", "--hidden-weight", "1",
                            "--alpha", "0.2", "--temperature", "3", "batch.max_length=64", "--batch-size", "2",
                            "--lr", "1e-3")
    assert code == 0, err
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert records and {"kd", "ce", "hidden"} <= set(records[-1])
    summary = json.loads((trained / "lmslim_distill.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["student"]["layers"] == 1
    assert summary["distill"]["alpha"] == 0.2 and summary["train"]["config"]["optim"]["lr"] == 1e-3
    code, _, err = run(capsys, "eval", trained, "--data", text, "--max-tokens", "200")
    assert code == 0, err

    shared = tmp_path / "shared"
    code, stdout, err = run(capsys, "share", "builtin:tiny-llama", "--group-size", "2", "--out", shared)
    assert code == 0, err
    assert "FLOPs per token are unchanged" in stdout
    report = json.loads((shared / "lmslim_share.json").read_text())
    assert report["params_after"] < report["params_before"] and report["size_mb_after"] < report["size_mb_before"]
    # Recovery: the shared model is the student; its saved weights still store each shared tensor once.
    recovered = tmp_path / "recovered"
    code, _, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--student", shared, "--data", text,
                       "--out", recovered, "--max-steps", "1", "batch.max_length=64")
    assert code == 0, err
    keys = set(load_file(str(recovered / "model.safetensors")))
    assert "model.layers.1.mlp.up_proj.weight" not in keys and "model.layers.0.mlp.up_proj.weight" in keys
    again = load_model(str(recovered)).model
    assert again.model.layers[0].mlp.up_proj.weight is again.model.layers[1].mlp.up_proj.weight


def test_embed_student_wider_than_teacher_refused(tmp_path, capsys, text):
    cfg = tmp_path / "wide.json"
    cfg.write_text(json.dumps({"hidden_size": 128, "intermediate_size": 64}))
    code, _, err = run(capsys, "distill", "--task", "embed", "--teacher", "builtin:tiny-bert", "--student-config",
                       cfg, "--data", text, "--out", tmp_path / "s", "--max-steps", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "must equal teacher width" in err, err
    assert not (tmp_path / "s").exists()


def test_teacher_cache_reused_across_runs(tmp_path, capsys, text):
    cache = tmp_path / "cache"
    runs = []
    for name in ("a", "b"):
        code, _, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--student-layers", "2",
                           "--data", text, "--out", tmp_path / name, "--max-steps", "2", "--teacher-cache", cache,
                           "--top-k", "16", "batch.max_length=64", "log.every_steps=1")
        assert code == 0, err
        runs.append(json.loads((tmp_path / name / "lmslim_distill.json").read_text()))
    assert runs[0]["teacher_cache"]["misses"] > 0 and runs[1]["teacher_cache"]["misses"] == 0
    first = runs[0]["teacher_cache"]
    assert runs[1]["teacher_cache"]["hits"] == first["hits"] + first["misses"]  # same rows looked up
    losses = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("a", "b")]
    assert losses[0] == losses[1]  # the cached soft targets are exactly what the teacher gave


def test_blockwise_fit_then_save_without_kd(tmp_path, capsys, text):
    out = tmp_path / "bw"
    code, stdout, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--student-layers", "2",
                            "--data", text, "--max-steps", "0", "--blockwise-epochs", "2", "--blockwise-samples", "4",
                            "--blockwise-seq-len", "64", "--out", out)
    assert code == 0, err
    summary = json.loads((out / "lmslim_distill.json").read_text())
    blocks = summary["blockwise"]["blocks"]
    assert len(blocks) == 1 and blocks[0]["teacher_span"] == [0, 2]
    assert blocks[0]["loss_after"] < blocks[0]["loss_before"]
    assert "blockwise: block 0" in stdout
    # The saved student holds the fitted block, not the teacher's layer 0.
    from lmslim.assets.tiny import build_tiny

    teacher, _ = build_tiny("tiny-llama")
    saved = load_file(str(out / "model.safetensors"))
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved[w], teacher.state_dict()[w])


def test_blockwise_needs_a_layer_cut_student(tmp_path, capsys, text):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 1}))
    code, _, err = run(capsys, "distill", "--teacher", "builtin:tiny-llama", "--student-config", cfg,
                       "--data", text, "--max-steps", "0", "--blockwise-epochs", "2", "--out", tmp_path / "x")
    assert code == 2 and "needs student_layers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
