"""Every shipped recipe validates (normal and --quick), and a tiny-model version of each runs end to end."""

from pathlib import Path

import pytest

from lmslim.recipes.run import compress
from lmslim.recipes.schema import load_recipe_file

ROOT = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(ROOT.rglob("*.yaml"))


def test_recipes_are_shipped():
    assert len(SHIPPED) >= 4 and (ROOT / "demo").is_dir()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates(path):
    for quick in (False, True):
        recipe, raw = load_recipe_file(path, quick=quick)
        assert recipe.stages and raw["name"]


def tiny_overrides(recipe, text_file) -> list[str]:
    """Point a shipped recipe at the tiny model and tiny budgets, keeping its stages and methods."""
    items = [f"data.{role}={text_file}" for role in ("train", "validation", "calibration", "eval")
             if getattr(recipe.data, role) is not None]
    items += ["eval.enabled=false", "bench.enabled=false"]
    for i, stage in enumerate(recipe.stages):
        opts, at = stage.options, f"stages.{i}.{stage.name}"
        for key, value in (("calib_samples", 4), ("seq_len", 64)):
            if key in opts:
                items.append(f"{at}.{key}={value}")
        if stage.name == "export" and opts.get("format") == "gguf":
            items.append(f"{at}.type=f16")  # the tiny model's 176-wide FFN rows fit no 32-weight block type
        if opts.get("blockwise"):
            items += [f"{at}.blockwise.epochs=1", f"{at}.blockwise.samples=4"]
        if "train" in opts:
            items += [f"{at}.train.max_steps=2", f"{at}.train.batch.batch_size=2", f"{at}.train.batch.max_length=64"]
            if "eval" in opts["train"]:
                items.append(f"{at}.train.eval.every_steps=1")
    return items


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_runs_on_tiny_model(path, tmp_path, text_file):
    recipe, _ = load_recipe_file(path, quick=True)
    recipe, raw = load_recipe_file(path, tiny_overrides(recipe, text_file), quick=True)
    res = compress("builtin:tiny-llama", recipe, raw, tmp_path / "out")
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert res["variants"][0]["stage"] is None
