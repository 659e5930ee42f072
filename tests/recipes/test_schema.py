import pytest
import yaml

from lmslim.core.errors import UserError
from lmslim.recipes.schema import apply_overrides, load_recipe_file, parse_recipe


def base(**kw):
    r = {"model": "builtin:tiny-llama", "data": {"eval": "e.txt", "calibration": "c.txt"},
         "stages": [{"quantize": {"method": "rtn", "bits": 4}}]}
    r.update(kw)
    return r


def test_valid_recipe_builds_technique_configs():
    r = parse_recipe(base(stages=[{"quantize": {"method": "gptq", "bits": 3, "group_size": 64}}, "export"]))
    from lmslim.recipes.stages import validate_stages

    cfg = validate_stages(r)[0].config
    assert type(cfg).__name__ == "GPTQConfig" and cfg.bits == 3 and cfg.group_size == 64
    assert [s.name for s in r.stages] == ["quantize", "export"]


@pytest.mark.parametrize("raw,message", [
    (base(evall={"max_tokens": 5}), "did you mean 'eval'"),
    (base(eval={"max_token": 5}), "did you mean 'max_tokens'"),
    (base(stages=[{"quantise": {"method": "rtn"}}]), "did you mean 'quantize'"),
    (base(stages=[{"quantize": {"method": "rtn", "bitz": 4}}]), "did you mean 'bits'"),
    (base(stages=[{"quantize": {"method": "nf4"}}]), "unknown quantization method 'nf4'"),
    (base(stages=[{"quantize": {"method": "rtn", "bits": 5}}]), "unsupported bits 5"),
    (base(stages=[]), "non-empty list"),
    (base(stages=[{"quantize": {}, "export": {}}]), "one-key mapping"),
    (base(stages=["export", {"quantize": {"method": "rtn"}}]), "must be the last stage"),
    (base(stages=[{"quantize": {"method": "rtn"}}, {"quantize": {"method": "rtn"}}]), "a model is quantized once"),
    (base(data={"eval": "e.txt"}, stages=[{"quantize": {"method": "gptq"}}]), "needs data.calibration"),
    (base(data={"calibration": "c.txt"}), "data.eval is not set"),
    (base(eval={"max_tokens": "many"}), "eval.max_tokens"),
    ([1, 2], "must be a YAML mapping"),
])
def test_bad_recipes_give_one_clear_error(raw, message):
    with pytest.raises(UserError) as e:
        parse_recipe(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_reach_stage_options_and_sections():
    raw = apply_overrides(base(), ["stages.0.quantize.bits=8", "eval.max_tokens=100", "bench.enabled=false"])
    r = parse_recipe(raw)
    assert r.stages[0].options["bits"] == 8 and r.eval.max_tokens == 100 and r.bench.enabled is False
    with pytest.raises(UserError, match="key=value"):
        apply_overrides(base(), ["eval.max_tokens"])
    with pytest.raises(UserError, match="no item 3"):
        apply_overrides(base(), ["stages.3.quantize.bits=8"])


def test_recipe_file_errors_and_quick(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe_file(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_recipe_file(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base(quick=["eval.max_tokens=64"])))
    r, _ = load_recipe_file(good)
    assert r.eval.max_tokens == 8192 and r.name == "good"
    r, raw = load_recipe_file(good, ["bench.repeats=2"], quick=True)
    assert r.eval.max_tokens == 64 and r.bench.repeats == 2 and raw["bench"]["repeats"] == 2


def test_distill_stage_takes_a_blockwise_fit():
    from lmslim.recipes.stages import validate_stages

    def recipe(options):
        return parse_recipe(base(data={"eval": "e.txt", "train": "t.txt"}, stages=[{"distill": options}]))

    stage = validate_stages(recipe({"student_layers": 2, "blockwise": {"epochs": 2, "lr": 1e-3}}))[0]
    assert type(stage.blockwise).__name__ == "BlockwiseConfig"
    assert stage.blockwise.epochs == 2 and stage.blockwise.lr == 1e-3
    for options, message in (({"student_layers": 2, "blockwise": {"epoch": 2}}, "did you mean 'epochs'"),
                             ({"blockwise": {"epochs": 2}}, "blockwise needs student_layers"),
                             ({"student_layers": 2, "blockwise": 3}, "blockwise must be a mapping"),
                             ({"student_layers": 2, "blockwise": {"lr": -1}}, "blockwise.lr must be > 0")):
        with pytest.raises(UserError, match=message):
            validate_stages(recipe(options))
