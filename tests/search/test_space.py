import random

import pytest

from lmslim.core.errors import UserError
from lmslim.recipes.schema import parse_recipe
from lmslim.recipes.stages import validate_stages
from lmslim.search.space import default_space, stages_for, suggest, techniques, with_overrides


class RandomTrial:
    """Draws like an Optuna trial (suggest_categorical), uniformly at random."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def suggest_categorical(self, name, choices):
        return self.rng.choice(choices)


@pytest.mark.parametrize("engine", ["torch", "llama.cpp", "onnxruntime"])
def test_every_draw_is_a_valid_recipe(engine):
    space = default_space(engine, hidden_size=576, n_layers=30)
    seen = set()
    for seed in range(300):
        stages = stages_for(suggest(RandomTrial(seed), space), space)
        recipe = parse_recipe({"model": "builtin:tiny-llama", "stages": stages,
                               "data": {"eval": "e.txt", "calibration": "c.txt", "train": "t.txt"}})
        validate_stages(recipe)  # order and options accepted exactly as lmslim compress would
        seen.add(tuple(techniques(stages)))
    assert len(seen) >= 3  # combinations across technique families, not one family
    if engine != "torch":  # dense engines: no unstructured sparsity by default
        assert not any("sparsity" in kinds for kinds in seen)


def test_overrides_and_constraints():
    space = default_space("llama.cpp", hidden_size=576, n_layers=30)
    small = with_overrides(space, {"gguf_type": ["q8_0", "q4_0"], "layers": [0, 0.5, 1.0]}, 576, 30)
    assert small.dims["gguf_type"] == ("q8_0", "q4_0") and small.dims["layers"] == (0, 0.5)  # 1.0 leaves no layer
    with pytest.raises(UserError, match="empty after constraints: group_size .*dividing the hidden size 576"):
        with_overrides(default_space("torch", 576, 30), {"group_size": [100]}, 576, 30)
    with pytest.raises(UserError, match="empty after constraints: quant"):
        with_overrides(default_space("torch", 576, 30), {"quant": []}, 576, 30)
    with pytest.raises(UserError, match="gguf_type.* not a dimension of engine torch .*engine llama.cpp"):
        with_overrides(default_space("torch", 576, 30), {"gguf_type": ["q8_0"]}, 576, 30)
    with pytest.raises(UserError, match="did you mean"):
        with_overrides(space, {"neuron": [0]}, 576, 30)
    with pytest.raises(UserError, match="unknown engine"):
        default_space("tensorrt", 576, 30)


def test_stages_follow_the_draw():
    space = default_space("torch", 576, 30)
    stages = stages_for({"heads": 0.0, "neurons": 0.25, "layers": 0.125, "kd_steps": 100, "sparsity": "2:4",
                         "quant": "gptq-w4", "group_size": 128}, space)
    assert [next(iter(s)) for s in stages] == ["prune", "prune", "distill", "prune", "quantize"]
    assert stages[3]["prune"]["n_m"] == "2:4" and stages[4]["quantize"]["group_size"] == 128
    assert techniques(stages) == ["structured", "distill", "sparsity", "quantize"]
    # nothing removed: no distillation, whatever kd_steps says
    assert stages_for({"heads": 0.0, "neurons": 0.0, "layers": 0.0, "kd_steps": 100, "sparsity": 0.0,
                       "quant": "none"}, space) == [{"export": {"format": "hf"}}]  # the input as it is


def test_shipped_search_spaces_load():
    from pathlib import Path

    from lmslim.search.space import load_overrides

    files = sorted((Path(__file__).parents[2] / "configs" / "search").glob("*.yaml"))
    assert files
    for f in files:
        engine = "llama.cpp" if "llama-cpp" in f.name else "onnxruntime" if "onnx" in f.name else "torch"
        space = with_overrides(default_space(engine, 576, 30), load_overrides(f), 576, 30)
        assert space.size() > 1
