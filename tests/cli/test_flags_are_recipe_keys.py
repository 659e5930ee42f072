"""One path per technique: a technique command's flags are its recipe stage's keys, and it runs that stage.

Drift is impossible by construction only if every key has its flag and every flag is a key (or is
declared, in the command's ``*_OUTSIDE_STAGE`` table, as the recipe's model, data, training config or
an output/runtime control). The keys come from the generated recipe reference (``stage_keys``), so
docs/recipes.md, the stage parse and the CLI are checked against each other.
"""

import json

import pytest
import typer.main

import sys

from lmslim.cli.main import app, main
from lmslim.recipes.stages import STAGES, stage_keys


def _tables() -> dict[str, dict]:
    """``NAME_OUTSIDE_STAGE`` tables of the CLI modules: the technique commands that run a stage."""
    found = {}
    for module in [m for n, m in list(sys.modules.items()) if n.startswith("lmslim.cli.")]:
        for attr in dir(module):
            if attr.endswith("_OUTSIDE_STAGE"):
                found[attr.removesuffix("_OUTSIDE_STAGE").lower()] = getattr(module, attr)
    return found


COMMANDS = _tables()


# Commands named like a stage that do not run it yet, and why: each entry is a known second path.
NOT_YET_ONE_PATH: dict[str, str] = {}


def test_every_stage_with_a_command_is_a_one_stage_recipe():
    commands = typer.main.get_command(app).commands
    assert {"quantize", "prune", "share", "distill"} <= set(COMMANDS)
    for name in STAGES:
        if name in commands and name not in NOT_YET_ONE_PATH:
            # a command named like a stage runs it (and declares its flags that are not stage keys)
            assert name in COMMANDS, f"lmslim {name}: declare {name.upper()}_OUTSIDE_STAGE and run the stage"
    assert not set(NOT_YET_ONE_PATH) & set(COMMANDS), "converted: remove it from NOT_YET_ONE_PATH"


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def _flag(key: str) -> str:
    return "--" + key.replace(".", "-").replace("_", "-")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_a_recipe_key_or_declared(command):
    keys = {k.replace(".", "_"): k for k in stage_keys(command)}
    outside = COMMANDS[command]
    for name, param in _params(command).items():
        if name in outside:
            assert name not in keys, f"{command}: {name} is a stage key but declared outside the stage"
            continue
        assert name in keys, f"{command}: flag {param.opts} is neither a {command} recipe key nor declared"
        assert param.opts[0] == _flag(keys[name]), f"{command}: key {keys[name]} must be spelled {_flag(keys[name])}"
        # No CLI-only default: a flag left out is a key left out, so the config's default applies on both paths.
        assert param.default in (None, (), []) or param.required, (command, name, param.default)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_recipe_key_has_a_flag(command):
    params = _params(command)
    outside = COMMANDS[command]
    for key in stage_keys(command):
        covered = key.replace(".", "_") in params or any(
            where == key or where.startswith(key + ".") for where in outside.values())
        assert covered, f"{command}: recipe key {key} has no flag ({_flag(key)})"


def test_declared_outside_flags_exist():
    for command, outside in COMMANDS.items():
        params = set(_params(command)) | {"ctx"}
        assert set(outside) <= params, (command, set(outside) - params)


def _weights(folder):
    from lmslim.modelio import resolve

    return resolve(str(folder)).weights_hash()


@pytest.mark.parametrize("flags,stage", [
    (["quantize", "--method", "rtn", "--bits", "8"], {"quantize": {"method": "rtn", "bits": 8}}),
    (["prune", "--method", "wanda", "--sparsity", "0.4", "--overrides", "*.down_proj=0.2", "--calib-samples", "4",
      "--seq-len", "32"],
     {"prune": {"method": "wanda", "sparsity": 0.4, "overrides": [["*.down_proj", 0.2]], "calib_samples": 4,
                "seq_len": 32}}),
    (["prune", "--method", "neurons", "--fraction", "0.5", "--calib-samples", "2", "--seq-len", "32"],
     {"prune": {"method": "neurons", "fraction": 0.5, "calib_samples": 2, "seq_len": 32}}),
])
def test_command_and_compress_stage_give_the_same_model(tmp_path, capsys, flags, stage):
    """The flag spelling and the recipe spelling of one stage produce bit-identical weights."""
    import yaml

    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text about many different things, written plainly. " * 100)
    cli_out = tmp_path / "cli"
    assert main([flags[0], "builtin:tiny-llama", *flags[1:], "--calib", str(calib), "--out", str(cli_out)]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "builtin:tiny-llama", "data": {"calibration": str(calib)},
                                      "stages": [stage], "eval": {"enabled": False}, "bench": {"enabled": False}}))
    assert main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert _weights(cli_out) == _weights(tmp_path / "run" / "model")
    # The command's report is the stage's report (what compress records) plus the input and sizes.
    report = json.loads((cli_out / f"lmslim_{flags[0]}.json").read_text())
    stage_json = json.loads(next((tmp_path / "run" / "stages").glob("00-*/stage.json")).read_text())
    assert set(stage_json["report"]) - {"seconds_total"} <= set(report)
    assert report["weights_sha256"] == _weights("builtin:tiny-llama") and report["calib"] in (None, str(calib))


def test_distill_command_and_compress_stage_give_the_same_student(tmp_path, capsys):
    """The options that once existed only on the command line (anchor, teacher cache) are stage keys with the
    same effect: the command and a one-stage compress run train bit-identical students."""
    import yaml

    text = tmp_path / "train.txt"
    text.write_text("Distillation moves knowledge from a teacher to a student, one step at a time. " * 60)
    cli_out = tmp_path / "cli"
    assert main(["distill", "--teacher", "builtin:tiny-llama", "--student-layers", "2", "--anchor", "last",
                 "--data", str(text), "--out", str(cli_out), "--max-steps", "2", "--teacher-cache",
                 str(tmp_path / "cache-a"), "--top-k", "16", "batch.max_length=64", "batch.batch_size=2"]) == 0
    stage = {"distill": {"student_layers": 2, "anchor": "last", "teacher_cache": str(tmp_path / "cache-b"),
                         "top_k": 16, "train": {"max_steps": 2, "batch": {"max_length": 64, "batch_size": 2}}}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "builtin:tiny-llama", "data": {"train": str(text)}, "stages": [stage],
                                      "eval": {"enabled": False}, "bench": {"enabled": False}}))
    assert main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert _weights(cli_out) == _weights(tmp_path / "run" / "model")
    summary = json.loads((cli_out / "lmslim_distill.json").read_text())
    stage_report = json.loads(next((tmp_path / "run" / "stages").glob("00-*/stage.json")).read_text())["report"]
    for report in (summary, stage_report):
        assert report["student"]["kept"] == [1] and report["student"]["anchor"] == "last"
        assert report["teacher_cache"]["misses"] > 0 and report["train"]["steps"] == 2
