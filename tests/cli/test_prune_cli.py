import json

import pytest
import torch

from lmslim.cli.main import main
from lmslim.core.io import sha256_file


def run(capsys, *args):
    code = main(list(args))
    c = capsys.readouterr()
    return code, c.out, c.err


@pytest.fixture
def calib(tmp_path):
    (tmp_path / "calib.txt").write_text("Calibration text about many things. " * 200)
    (tmp_path / "short.txt").write_text("only a few words")
    return tmp_path


@pytest.mark.parametrize("extra,message", [
    (["--method", "magnitude", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--method", "wanda", "--sparsity", "-0.5"], "sparsity must be in [0, 1)"),
    (["--method", "sparsegpt", "--n-m", "4:4"], "0 < N < M"),
    (["--method", "magnitude", "--n-m", "5:4"], "0 < N < M"),
    (["--method", "wanda", "--n-m", "2:4", "--sparsity", "0.5"], "not both"),
    (["--method", "heads", "--drop-heads", "4"], "only 4"),
    (["--method", "heads", "--fraction", "1.5"], "must be in [0, 1)"),
    (["--method", "heads", "--sparsity", "0.5"], "take fraction"),
    (["--method", "layers", "--drop-layers", "2"], "at least one must stay"),
    (["--method", "layers"], "how many layers"),
    (["--method", "neurons", "--n-m", "2:4"], "does not apply to neurons"),
    (["--method", "wanda", "--calib", "SHORT", "--seq-len", "64"], "calibration data too short"),
    (["--method", "obd"], "unknown pruning method 'obd'"),
    (["--method", "wanda", "--scope", "global"], "does not apply to wanda"),
    (["--method", "width", "--scope", "global"], "does not apply to width"),
    (["--method", "width", "--fraction", "0.001"], "rounds to none"),
    (["--method", "magnitude", "--overrides", "nonsense"], "PATTERN=FRACTION"),
    (["--method", "magnitude", "--ignore", "*"], "no eligible layers"),
])
def test_prune_bad_input(calib, capsys, extra, message):
    extra = [{"SHORT": str(calib / "short.txt")}.get(a, a) for a in extra]
    out = calib / "p"
    code, _, err = run(capsys, "prune", "builtin:tiny-llama", "--out", str(out), "--calib", str(calib / "calib.txt"),
                       "--calib-samples", "2", "--seq-len", "32", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert not [p for p in calib.iterdir() if p.name.startswith(".p")]  # no temp dirs left behind


def test_prune_wanda_roundtrip_cli(calib, capsys):
    from lmslim.assets.tiny import tiny_path

    src = tiny_path("tiny-llama")
    before = sha256_file(src / "model.safetensors")
    out = calib / "w"
    code, stdout, err = run(capsys, "prune", str(src), "--method", "wanda", "--sparsity", "0.5",
                            "--layer-sparsity", "*.down_proj=0.25", "--calib", str(calib / "calib.txt"),
                            "--calib-samples", "4", "--seq-len", "64", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "lmslim_prune.json").read_text())
    assert report["storage"] == "dense"  # zeros stored densely: a folder plain transformers loads (docs/model-io.md)
    assert report["module_sparsity"]["model.layers.0.mlp.down_proj"] == pytest.approx(0.25, abs=0.01)
    assert report["calibration"] == {"samples": 4, "seq_len": 64}
    assert sha256_file(src / "model.safetensors") == before  # input untouched
    code, _, err = run(capsys, "prune", str(src), "--method", "magnitude", "--out", str(out))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "eval", str(out), "--data", str(calib / "calib.txt"), "--max-tokens", "200")
    assert code == 0, err
    code, stdout, err = run(capsys, "bench", str(out), "--prompt-len", "8", "--gen-len", "4", "--repeats", "1",
                            "--json", str(calib / "b.json"))
    assert code == 0, err
    assert "no speedup on this device" in " ".join(stdout.split())


def test_prune_structured_chain_cli(calib, capsys):
    from transformers import AutoModelForCausalLM

    a, b = calib / "n", calib / "nl"
    common = ["--calib", str(calib / "calib.txt"), "--calib-samples", "2", "--seq-len", "32"]
    code, _, err = run(capsys, "prune", "builtin:tiny-llama", "--method", "neurons", "--fraction", "0.5",
                       "--out", str(a), *common)
    assert code == 0, err
    code, _, err = run(capsys, "prune", str(a), "--method", "layers", "--drop", "1", "--out", str(b), *common)
    assert code == 0, err
    report = json.loads((b / "lmslim_prune.json").read_text())
    assert report["layers_after"] == 1 and report["storage"] == "dense"
    model = AutoModelForCausalLM.from_pretrained(b)  # uniform shapes: plain transformers loads it
    assert model.config.intermediate_size == 88 and model.config.num_hidden_layers == 1
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    code, _, err = run(capsys, "prune", str(b), "--method", "heads", "--fraction", "0.25", "--scope", "global",
                       "--out", str(calib / "h"), *common)
    assert code == 0, err
    code, _, err = run(capsys, "eval", str(calib / "h"), "--data", str(calib / "calib.txt"), "--max-tokens", "100")
    assert code == 0, err
    code, _, err = run(capsys, "prune", str(b), "--method", "width", "--fraction", "0.25", "--out", str(calib / "w"),
                       *common)
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(calib / "w").config.hidden_size == 48
