"""The distill stage does everything `lmslim distill` does: embedding distillation and an untrained student."""

import json

import yaml

from lmslim.cli.main import main


def _run(tmp_path, stage: dict, model: str, task: str = "clm", data: str | None = None) -> dict:
    recipe = tmp_path / "r.yaml"
    train = data or str(tmp_path / "sentences.txt")
    recipe.write_text(yaml.safe_dump({"model": model, "data": {"train": train, "validation": train},
                                      "stages": [{"distill": stage}], "eval": {"enabled": False, "task": task},
                                      "bench": {"enabled": False}}))
    assert main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    return json.loads(next((tmp_path / "run" / "stages").glob("00-*/stage.json")).read_text())["report"]


def test_embedding_distillation_in_a_recipe(tmp_path, capsys):
    (tmp_path / "sentences.txt").write_text("The cat sat on the mat.\nA dog runs in the park.\n"
                                            "Rain falls on the town.\nShe reads a long book.\n" * 20)
    report = _run(tmp_path, {"student_layers": 2, "train": {"max_steps": 2, "batch": {"batch_size": 4,
                                                                                     "max_length": 32}}},
                  "builtin:tiny-bert", task="embed")
    assert report["distill"]["task"] == "embed" and report["student"]["layers"] == 1
    assert report["train"]["steps"] == 2 and 0.0 < report["train"]["eval"]["mean_cosine"] <= 1.0


def test_untrained_student_in_a_recipe(tmp_path, capsys):
    from lmslim.assets.tiny import build_tiny
    from lmslim.modelio import load_model

    (tmp_path / "sentences.txt").write_text("Plain text for a student that is only cut, never trained. " * 40)
    report = _run(tmp_path, {"student_layers": [1], "untrained": True}, "builtin:tiny-llama")
    assert report["train"] is None and report["student"]["kept"] == [1]
    teacher, _ = build_tiny("tiny-llama")
    student = load_model(str(tmp_path / "run" / "model")).model
    w = "model.layers.0.mlp.down_proj.weight"
    assert (student.state_dict()[w] == teacher.state_dict()["model.layers.1.mlp.down_proj.weight"]).all()
