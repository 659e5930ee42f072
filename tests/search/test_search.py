"""``lmslim search`` end to end on a tiny model: trials, cache, front, best.yaml reproduced, resume, bad input."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from lmslim.cli.main import main

TORCH_SPACE = {"neurons": [0, 0.25], "layers": [0], "kd_steps": [0], "sparsity": [0], "quant": ["none", "rtn-w8",
                                                                                                 "rtn-w4"],
               "group_size": [32]}


def _args(model, texts, out, space_file, trials, engine="torch", extra=()):
    return ["search", str(model), "--data", str(texts["eval"]), "--calib", str(texts["train"]),
            "--budget", "ppl<=+20%", "--engine", engine, "--trials", str(trials), "--space", str(space_file),
            "--out", str(out), "--proxy-tokens", "400", "--full-tokens", "800", "--rounds", "1", "--front-max", "2",
            "--prompt-len", "16", "--gen-len", "8", "--threads", "1", *extra]


def _study(out):
    import optuna

    return optuna.load_study(study_name="lmslim-search", storage=f"sqlite:///{out / 'study.db'}")


def test_search_finds_reproducible_best_and_resumes(block_model, texts, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TORCH_SPACE))
    out = tmp_path / "search"
    assert main(_args(block_model, texts, out, space, 3)) == 0, capsys.readouterr().err
    summary = json.loads((out / "search.json").read_text())
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 3
    front, best = summary["front"], summary["best"]
    assert front and best is not None and best["within_budget"]
    base_ppl = summary["input"]["perplexity"]
    assert best["full"]["perplexity"] <= 1.2 * base_ppl
    # Every re-measured variant is a complete compress result the report draws; trials are its grey points.
    rows = json.loads((out / "report" / "rows.json").read_text())
    assert sum(not r["background"] for r in rows) == 1 + len(front)  # the input and the front
    finals = {json.loads(p.read_text())["variants"][-1]["weights_sha256"] for p in out.glob("trials/*/results.json")}
    shown = {json.loads((out / "trials" / r["recipe"] / "results.json").read_text())["variants"][-1]["weights_sha256"]
             for r in front} | {json.loads(next(out.glob("trials/*/results.json")).read_text())["input"]["weights_sha256"]}
    assert sum(r["background"] for r in rows) == len(finals - shown)  # every other trial, once, in grey
    # best.yaml reproduces the variant: same weights, same full-window perplexity.
    again = tmp_path / "again"
    assert main(["compress", "--recipe", str(out / "best.yaml"), "--out", str(again), "--threads", "1"]) == 0
    res = json.loads((again / "results.json").read_text())
    trial = json.loads((out / "trials" / best["recipe"] / "results.json").read_text())
    assert res["variants"][-1]["weights_sha256"] == trial["variants"][-1]["weights_sha256"]
    assert res["variants"][-1]["eval"]["perplexity"] == pytest.approx(best["full"]["perplexity"], rel=1e-9)
    # Resuming with a higher trial count runs only the new trials; earlier trial folders are not redone.
    stamps = {p.name: (p / "results.json").stat().st_mtime_ns for p in (out / "trials").iterdir()
              if (p / "results.json").is_file()}
    assert main(_args(block_model, texts, out, space, 4)) == 0
    study = _study(out)
    assert len([t for t in study.trials if t.state.is_finished()]) == 4
    assert all((out / "trials" / k / "results.json").stat().st_mtime_ns == v for k, v in stamps.items())
    # A run with other settings cannot join the study.
    capsys.readouterr()
    assert main(_args(block_model, texts, out, space, 4, extra=["--objective", "size_mb"])) == 2
    assert "other settings (objective)" in capsys.readouterr().err


def test_two_workers_share_one_study_without_losing_or_repeating_trials(block_model, texts, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TORCH_SPACE))
    out = tmp_path / "search"
    out.mkdir()
    (out / "search.yaml").write_text("")  # marks a search folder both workers join
    cmd = [sys.executable, "-m", "lmslim", *_args(block_model, texts, out, space, 5)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    logs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in logs]
    trials = _study(out).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert 5 <= len(finished) <= 6  # at most one over: both workers may start the last trial together
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)  # none lost (FAIL) or left RUNNING
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers measured trials
    computed = [t.user_attrs["recipe"] for t in finished if t.state.name == "COMPLETE" and not t.user_attrs["reused"]]
    assert len(computed) == len(set(computed))  # a recipe drawn twice was run once, then read back
    assert (out / "best.yaml").is_file() and (out / "report" / "report.html").is_file()


def test_search_in_llama_cpp_measures_gguf_files(block_model, texts, tmp_path, capsys):
    from tests.engines import require_engines

    require_engines("llama_cpp")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"neurons": [0, 0.25], "layers": [0], "kd_steps": [2], "gguf_type": ["q8_0", "q4_0"],
                                     "gguf_method": ["rtn"], "importance": [False], "embed_type": ["default"]}))
    out = tmp_path / "search"
    assert main(_args(block_model, texts, out, space, 3, engine="llama.cpp")) == 0, capsys.readouterr().err
    summary = json.loads((out / "search.json").read_text())
    assert summary["front"] and all(r["engine"] == "llama.cpp" for r in summary["front"])
    for row in summary["front"]:  # each front variant is the trial's GGUF file, measured in llama.cpp
        res = json.loads((out / "front").glob(f"*-{row['recipe']}").__next__().joinpath("results.json").read_text())
        assert res["variants"][-1]["model"].endswith("model.gguf")
        assert res["variants"][-1]["eval"]["engine"]["name"] == "llama.cpp"
    stages = yaml.safe_load((out / "best.yaml").read_text())["stages"] if summary["best"] else []
    assert not stages or stages[-1]["export"]["format"] == "gguf"


@pytest.mark.parametrize("change, message", [
    ({"--budget": "ppl<5"}, "cannot parse budget term"),
    ({"--objective": "speed"}, "unknown objective"),
    ({"--engine": "tensorrt"}, "unknown engine"),
    ({"--time": "soon"}, "--time takes a duration"),
    ({"space": {"quant": []}}, "search space is empty after constraints"),
    ({"space": {"gguf_type": ["q8_0"]}}, "not a dimension of engine torch"),
    ({"--storage": "nosuchdb://x"}, "cannot open --storage"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(block_model, texts, tmp_path, capsys, change, message):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(change.get("space", TORCH_SPACE)))
    out = tmp_path / "search"
    args = _args(block_model, texts, out, space, 2)
    for flag, value in change.items():
        if flag.startswith("--"):
            args = args[:args.index(flag)] + [flag, value] + args[args.index(flag) + 2:] if flag in args \
                else args + [flag, value]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_missing_engine_is_refused_before_anything_is_written(block_model, texts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"gguf_type": ["q8_0"]}))
    out = tmp_path / "search"
    assert main(_args(block_model, texts, out, space, 2, engine="llama.cpp")) == 2
    assert "llama" in capsys.readouterr().err and not out.exists()
