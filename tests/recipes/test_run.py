import json

import pytest
import yaml

from lmslim.cli.main import main
from lmslim.core.errors import UserError
from lmslim.core.io import sha256_file
from lmslim.recipes import stages as stages_mod
from lmslim.recipes.run import compress
from lmslim.recipes.schema import load_recipe_file


def write_recipe(path, text_file, stages, measure=False):
    raw = {"model": "builtin:tiny-llama", "data": {"calibration": str(text_file), "eval": str(text_file)},
           "stages": stages,
           "eval": {"enabled": measure, "max_tokens": 600, "window": 128, "stride": 64},
           "bench": {"enabled": measure, "prompt_len": 8, "gen_len": 4, "repeats": 2, "warmup": 1}}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_compress_measures_every_stage_and_leaves_input_untouched(tmp_path, text_file, capsys):
    from lmslim.assets.tiny import tiny_path

    src = tiny_path("tiny-llama")
    before = sha256_file(src / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", text_file,
                          [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4,
                                         "seq_len": 64}}, "export"], measure=True)
    out = tmp_path / "out"
    code = main(["compress", str(src), "--recipe", str(recipe), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    # export leaves the weights as they are: baseline + quantize only.
    assert [v["stage"] for v in res["variants"]] == [None, "quantize"]
    base, q = res["variants"]
    assert base["eval"]["tokens_scored"] == q["eval"]["tokens_scored"] == 599
    assert q["bench"]["quantization"]["method"] == "gptq" and q["bench"]["size_mb"] < base["bench"]["size_mb"]
    assert q["weights_sha256"] != base["weights_sha256"] and q["model"] == "model"
    assert (out / "model" / "config.json").is_file() and not list((out / "stages").glob("*/model"))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"] == str(src)
    assert sha256_file(src / "model.safetensors") == before
    # The final folder is a normal lmslim model.
    assert main(["eval", str(out / "model"), "--data", str(text_file), "--max-tokens", "100"]) == 0
    # Refuses to overwrite; nothing else written.
    capsys.readouterr()
    assert main(["compress", str(src), "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_interrupted_run_resumes_without_redoing_finished_stages(tmp_path, text_file, monkeypatch):
    recipe_path = write_recipe(tmp_path / "r.yaml", text_file,
                               [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}, "export"])
    recipe, raw = load_recipe_file(recipe_path)
    calls = []
    real = {name: kind for name, kind in stages_mod.STAGES.items()}

    def spy(name, fail=False):
        kind = real[name]

        def run(lm, obj, ctx):
            calls.append(name)
            if fail:
                raise KeyboardInterrupt  # the user presses Ctrl-C during this stage
            return kind.run(lm, obj, ctx)
        return run

    import dataclasses

    monkeypatch.setitem(stages_mod.STAGES, "quantize", dataclasses.replace(real["quantize"], run=spy("quantize")))
    monkeypatch.setitem(stages_mod.STAGES, "export", dataclasses.replace(real["export"], run=spy("export", fail=True)))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress("builtin:tiny-llama", recipe, raw, out)
    assert not out.exists() and (tmp_path / ".out.partial" / "stages" / "00-quantize" / "done.json").is_file()
    monkeypatch.setitem(stages_mod.STAGES, "export", dataclasses.replace(real["export"], run=spy("export")))
    calls.clear()
    compress("builtin:tiny-llama", recipe, raw, out)
    assert calls == ["export"]  # quantize was complete and fingerprinted: skipped
    assert (out / "model").is_dir() and not (tmp_path / ".out.partial").exists()
    # A changed stage option changes the fingerprint: that stage and the ones after it run again.
    recipe2, raw2 = load_recipe_file(recipe_path, ["stages.0.quantize.bits=8", "stages.0.quantize.group_size=null"])
    calls.clear()
    compress("builtin:tiny-llama", recipe2, raw2, tmp_path / "out2")
    assert calls == ["quantize", "export"]


def test_compress_bad_input_is_one_line(tmp_path, text_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", text_file, [{"quantize": {"method": "rtn"}}])
    for args, message in [
        (["--recipe", str(tmp_path / "nope.yaml")], "does not exist"),
        (["--recipe", str(recipe), "stages.0.quantize.bits=7"], "unsupported bits 7"),
        (["--recipe", str(recipe), "stages.0.quantize.bitz=4"], "did you mean 'bits'"),
        (["builtin:no-such-model", "--recipe", str(recipe)], "no-such-model"),
    ]:
        code = main(["compress", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
        assert not (tmp_path / "o").exists()


def test_missing_calibration_file_fails_before_any_stage(tmp_path, text_file):
    recipe_path = write_recipe(tmp_path / "r.yaml", text_file, [{"quantize": {"method": "gptq"}}])
    recipe, raw = load_recipe_file(recipe_path, [f"data.calibration={tmp_path / 'missing.txt'}"])
    with pytest.raises(UserError, match="missing.txt"):
        compress("builtin:tiny-llama", recipe, raw, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "text.txt"]  # nothing written
