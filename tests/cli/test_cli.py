import json
import subprocess
import sys

import pytest

from lmslim.cli.main import main
from lmslim.core.io import sha256_file


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_INPUTS = [
    (["eval", "./missing-model", "--data", "x.txt"], "does not exist"),
    (["eval", "builtin:nope", "--data", "DATA"], "unknown builtin model"),
    (["eval", "builtin:tiny-llama", "--data", "EMPTY"], "is empty"),
    (["eval", "builtin:tiny-llama", "--data", "BINARY"], "binary"),
    (["eval", "builtin:tiny-bert", "--data", "DATA", "--task", "clm"], "cannot do task clm"),
    (["eval", "builtin:tiny-llama", "--data", "DATA", "--task", "seq-cls"], "expected '__label__<name> text'"),
    (["eval", "builtin:tiny-llama", "--data", "DATA", "--max-tokens", "0"], "--max-tokens must be >= 2"),
    (["eval", "builtin:tiny-llama", "--data", "DATA", "--task", "dance"], "unknown task"),
    (["bench", "builtin:tiny-llama", "--prompt-len", "-3"], "--prompt-len must be >= 1"),
    (["bench", "builtin:tiny-llama", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "NOTMODEL"], "not a model folder"),
    (["fetch", "imagenet"], "unknown asset"),
    (["compare", "NOTJSON"], "not a JSON result file"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    (tmp_path / "data.txt").write_text("Some text to score. " * 20)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "not.json").write_text("{nope")
    subst = {"DATA": str(tmp_path / "data.txt"), "EMPTY": str(tmp_path / "empty.txt"),
             "BINARY": str(tmp_path / "bin.txt"), "NOTMODEL": str(tmp_path / "notmodel"),
             "NOTJSON": str(tmp_path / "not.json")}
    out_json = tmp_path / "result.json"
    argv = [subst.get(a, a) for a in args]
    if argv[0] in ("eval", "bench"):
        argv += ["--json", str(out_json)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out_json.exists()


def test_eval_and_bench_write_results_and_leave_model_untouched(tmp_path, capsys):
    from lmslim.assets.tiny import tiny_path

    model_dir = tiny_path("tiny-llama")
    before = sha256_file(model_dir / "model.safetensors")
    (tmp_path / "d.txt").write_text("Hello there, general text for a tiny model. " * 10)
    code, _, err = run(capsys, "eval", str(model_dir), "--data", str(tmp_path / "d.txt"), "--window", "32",
                       "--stride", "16", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    code, _, err = run(capsys, "bench", str(model_dir), "--prompt-len", "8", "--gen-len", "4", "--repeats", "2",
                       "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    for r in (e, b):
        assert r["model"]["weights_sha256"] and r["machine"]["cpu"] and r["libraries"]["torch"] and r["timestamp"]
    assert e["kind"] == "eval" and e["data"]["tokens"] == e["tokens_scored"] > 0
    assert b["kind"] == "bench" and b["settings"]["gen_len"] == 4
    assert sha256_file(model_dir / "model.safetensors") == before
    code, out, _ = run(capsys, "compare", str(tmp_path / "e.json"), str(tmp_path / "b.json"),
                       "--markdown", str(tmp_path / "t.md"))
    assert code == 0 and "1.00×" in out and (tmp_path / "t.md").exists()


def test_token_cls_eval_from_conll(tmp_path, capsys):
    import torch
    from transformers import BertConfig, BertForTokenClassification

    from lmslim.assets.tiny import byte_tokenizer
    from lmslim.data.synthetic import synthetic_ner, to_conll

    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    tok = byte_tokenizer("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    BertForTokenClassification(cfg).save_pretrained(tmp_path / "ner")
    tok.save_pretrained(tmp_path / "ner")
    (tmp_path / "ner.conll").write_text(to_conll(*synthetic_ner(8)))
    code, out, err = run(capsys, "eval", str(tmp_path / "ner"), "--data", str(tmp_path / "ner.conll"),
                         "--task", "token-cls", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["entities"]) <= {"PER", "LOC", "ORG"} and "micro avg" in out


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmslim", "bench", str(tmp_path / "nope")], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model path {tmp_path / 'nope'} does not exist"
