from pathlib import Path

from lmslim.recipes.reference import render


def test_recipe_reference_is_current():
    doc = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
    assert doc.read_text() == render(), "regenerate: python -m lmslim.recipes.reference > docs/recipes.md"


def test_reference_lists_every_stage_and_method():
    text = render()
    for needle in ("### `quantize`", "### `prune`", "### `distill`", "### `finetune`", "### `share`", "### `export`",
                   "`method: gptq`", "`method: wanda`", "| `alpha` |"):
        assert needle in text
