import json

import pytest

from lmslim.cli.main import main
from lmslim.core.io import sha256_file


def run(capsys, *args):
    code = main(list(args))
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.mark.parametrize("extra,message", [
    (["--method", "rtn", "--bits", "5"], "unsupported bits 5"),
    (["--method", "rtn", "--bits", "16"], "unsupported bits 16"),
    (["--method", "nf4"], "unknown quantization method 'nf4'"),
    (["--method", "gptq", "--calib", "EMPTY"], "is empty"),
    (["--method", "gptq", "--calib", "SHORT", "--seq-len", "64"], "calibration data too short"),
    (["--method", "dynamic-int8", "--bits", "4"], "does not apply to dynamic-int8"),
    (["--method", "rtn", "--ignore", "*"], "no eligible layers"),
])
def test_quantize_bad_input(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("only a few words")
    extra = [{"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}.get(a, a) for a in extra]
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", "builtin:tiny-llama", "--out", str(out), *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]  # no temp dirs left behind


def test_quantize_roundtrip_cli(tmp_path, capsys):
    from lmslim.assets.tiny import tiny_path

    src = tiny_path("tiny-llama")
    before = sha256_file(src / "model.safetensors")
    (tmp_path / "calib.txt").write_text("Calibration text about many things. " * 200)
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32",
                            "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--seq-len", "64",
                            "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "lmslim_quantize.json").read_text())
    assert report["modules"] == 14 and report["size_mb_after"] < report["size_mb_before"]
    assert sha256_file(src / "model.safetensors") == before  # input untouched
    # Refuses to overwrite, then evaluates and benches the saved artefact.
    code, _, err = run(capsys, "quantize", str(src), "--method", "rtn", "--out", str(out))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "eval", str(out), "--data", str(tmp_path / "calib.txt"), "--max-tokens", "200")
    assert code == 0, err
    code, _, err = run(capsys, "bench", str(out), "--prompt-len", "8", "--gen-len", "4", "--repeats", "2",
                       "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["quantization"]["method"] == "gptq" and b["quantization"]["bits"] == [4]
    code, _, err = run(capsys, "quantize", str(out), "--method", "rtn", "--out", str(tmp_path / "again"))
    assert code == 2 and "already quantized" in err
