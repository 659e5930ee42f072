"""Fuzzing the front door of ``lmslim compress`` and ``lmslim train``: whatever a user writes, the only
exception that comes out is a one-line, bounded :class:`UserError` (exit 2), never a traceback (exit 1).

Covered: recipe mappings (every stage kind and option name, with mistyped values, and fully random
data) through what ``compress`` checks before it loads data (``parse_recipe``, which runs
``validate_stages``, then ``check_output``); every technique config class called directly; random YAML
text (aliases, anchors, alias bombs, deep nesting, tags, binary, huge numbers, invalid UTF-8) through
``load_recipe_file`` and ``TrainConfig.from_yaml``; random ``key=value`` overrides through
``apply_overrides`` and ``TrainConfig.from_dict``. Memory is bounded by safeyaml's limits; each test
also checks the growth of peak RSS, and every example has a deadline.

``LMSLIM_FUZZ_EXAMPLES`` is the total number of examples over the file's fuzz tests (default 300, ~30 s
on two cores); ``--hypothesis-show-statistics`` shows how many were accepted and refused. The full run
(>= 10,000 examples)::

    LMSLIM_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -q tests/recipes/test_fuzz.py \\
        --hypothesis-show-statistics
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import resource
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmslim.compress.distill import DistillConfig
from lmslim.compress.distill.blockwise import BlockwiseConfig
from lmslim.compress.prune import PRUNERS
from lmslim.compress.quantize import QUANTIZERS
from lmslim.compress.share import ShareConfig
from lmslim.core.errors import MAX_MESSAGE, UserError
from lmslim.core.guard import check_output
from lmslim.recipes.run import recipe_inputs
from lmslim.recipes.schema import apply_overrides, load_recipe_file, parse_recipe
from lmslim.compress.export import ExportConfig
from lmslim.recipes.stages import validate_stages
from lmslim.train.config import TrainConfig, all_keys

TOTAL = int(os.environ.get("LMSLIM_FUZZ_EXAMPLES", "300"))
# Share of the total per test (sums to 1): the recipe mappings get the most, being the widest input.
WEIGHTS = {"stages": 0.25, "random_recipe": 0.1, "configs": 0.15, "recipe_yaml": 0.15, "train_yaml": 0.1,
           "recipe_overrides": 0.1, "train_dict": 0.15}
RSS_GROWTH_MB = 1024  # alias bombs and huge documents must be refused long before this


def fuzz(name: str):
    return settings(max_examples=max(1, math.ceil(TOTAL * WEIGHTS[name])), deadline=20_000, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def only_user_error(fn, *args, **kwargs):
    """Run ``fn``; a UserError must be one bounded line; any other exception fails the example."""
    try:
        fn(*args, **kwargs)
        event("accepted")
    except UserError as e:
        event("refused (UserError)")
        message = str(e)
        assert "\n" not in message and len(message) <= MAX_MESSAGE, message
        # build_config's safety net turns a stray TypeError/ValueError from a rule into this; the type
        # checks must catch the value first.
        assert "invalid options (" not in message, message


@pytest.fixture(autouse=True)
def _bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < RSS_GROWTH_MB, f"peak RSS grew by {grown_mb:.0f} MB"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A file path for YAML inputs; its folder also holds the fuzzed output path."""
    return tmp_path_factory.mktemp("fuzz") / "input.yaml"


# ------------------------------------------------------------------------------------------------ values

WORDS = ["half", "", " ", "2:4", "1:2,2:4", "4:2", "0:4", "re:(", "re:[a-", "re:.*proj", "*", "*.mlp.*", "uniform",
         "kept", "last", "layer", "global", "mean", "first", "index", "hf", "auto", "int8", "fbgemm", "dequant",
         "mse", "cosine", "clm", "embed", "input", "wanda", "gptq", "0,2,4", "[0, 2]", "2", "-1", "1e-3", "nan",
         "adamw", "sgd", "linear", "bf16", "fp32", "dynamic", "ddp", "fsdp", "none", "reuse", "eval_loss", "min",
         "true", "✓", "é\u0301", "\x00", "\ufeff", "\U0001F600", "x\ny"]
words = st.sampled_from(WORDS) | st.integers(500, 800).map(lambda n: "a" * n)
huge = st.sampled_from([31, 63, 30, 400]).map(lambda e: 10**e) | st.sampled_from([1e308, -1e308, 1e-320, -(2**63)])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(), huge,
    st.floats(), st.sampled_from([0.0, 0.5, 1.0, -0.5, float("nan"), float("inf"), -float("inf")]),
    words, st.text(max_size=20), st.binary(max_size=8), st.dates(),
    st.datetimes(max_value=datetime.datetime(9000, 1, 1)),
)
# What YAML can build: nested lists and mappings (keys are any scalar), tuples (!!omap), sets (!!set).
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none(), st.booleans()),
                                            inner, max_size=4),
                            st.frozensets(st.integers(0, 5) | st.text(max_size=3), max_size=3)),
    max_leaves=10)


def plausible(t) -> st.SearchStrategy:
    """Values of the annotated type, often valid, often out of range: the rules past the type check run."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[plausible(a) for a in typing.get_args(t)])
    if t is type(None):
        return st.none()
    if t is bool:
        return st.booleans()
    if t is int:
        return st.integers(-3, 300) | st.sampled_from([1, 2, 4, 8, 128]) | st.integers(0, 300).map(float)
    if t is float:
        return st.floats(-0.5, 2.5) | st.sampled_from([0.0, 0.5, 0.9, 1e-4, 1]) | st.integers(-1, 3)
    if t is str:
        return words
    if origin is tuple and typing.get_args(t)[1:] == (Ellipsis,):
        return st.lists(words, max_size=3)
    if t is tuple:  # prune overrides: [[pattern, sparsity], ...]
        return st.lists(st.lists(words | st.floats(-1, 2), min_size=1, max_size=3), max_size=3)
    # Any: n_m, layer_map
    return st.one_of(words, st.lists(st.integers(-1, 8), max_size=3),
                     st.lists(st.lists(st.integers(-1, 8) | words, max_size=3), max_size=3))


def value_for(t, valid: bool) -> st.SearchStrategy:
    """``valid``: a value of the right type; else also (a third of the time) any value at all."""
    return plausible(t) if valid else st.one_of(plausible(t), plausible(t), junk)


def hints(cls) -> dict:
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.name != "needs_calibration"}


def options_for(cls, valid: bool, extra: dict | None = None) -> st.SearchStrategy:
    """A mapping of some of ``cls``'s option names (plus ``extra``); unless ``valid``, sometimes an unknown key."""
    optional = {name: value_for(t, valid) for name, t in hints(cls).items()}
    optional.update(extra or {})
    known = st.fixed_dictionaries({}, optional=optional)
    if valid:
        return known
    return st.one_of(known, known, st.tuples(known, st.text(max_size=8), junk).map(lambda x: {**x[0], x[1]: x[2]}))


def train_dict(valid: bool) -> st.SearchStrategy:
    """A nested training-config mapping built from the dotted keys of ``TrainConfig``."""
    leaves = {}
    for key in all_keys():
        cls, *path, leaf = [TrainConfig, *key.split(".")]
        for part in path:
            cls = typing.get_type_hints(cls)[part]
        leaves[key] = value_for(typing.get_type_hints(cls)[leaf], valid)

    def nest(flat: dict) -> dict:
        out: dict = {}
        for key, value in flat.items():
            *path, leaf = key.split(".")
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        return out

    nested = st.fixed_dictionaries({}, optional=leaves).map(nest)
    return nested if valid else st.one_of(nested, nested, junk)


def stage_options(valid: bool) -> dict[str, st.SearchStrategy]:
    """Options of every stage kind, by name."""
    count = value_for(int, valid)

    def method_stage(registry):
        per_method = [options_for(cls, valid, {"calib_samples": count, "seq_len": count}).map(
            lambda o, name=name: {"method": name, **o}) for name, (cls, _) in registry.entries.items()]
        return st.one_of(*per_method) if valid else st.one_of(*per_method, st.fixed_dictionaries({"method": junk}))

    layers = st.one_of(st.integers(-1, 6), st.lists(st.integers(-1, 6), max_size=4), words)
    return {
        "quantize": method_stage(QUANTIZERS),
        "prune": method_stage(PRUNERS),
        "share": options_for(ShareConfig, valid),
        "export": options_for(ExportConfig, valid),
        "finetune": st.fixed_dictionaries({}, optional={"train": train_dict(valid),
                                                        "keep_sparsity": value_for(bool, valid)}),
        "distill": options_for(DistillConfig, valid, {
            "train": train_dict(valid), "keep_sparsity": value_for(bool, valid), "teacher": value_for(str, valid),
            "student_layers": layers if valid else layers | junk,
            "blockwise": options_for(BlockwiseConfig, valid) if valid else options_for(BlockwiseConfig, valid) | junk}),
    }


typed_stage, any_stage = [st.one_of(*[o.map(lambda o, n=name: {n: o}) for name, o in stage_options(v).items()])
                          for v in (True, False)]
stage_entry = st.one_of(typed_stage, typed_stage, any_stage, any_stage,
                        st.sampled_from(list(stage_options(True)) + ["quantise", ""]),  # the bare-name form
                        junk)
ALL_DATA = {"train": "t.txt", "validation": "v.txt", "calibration": "c.txt", "eval": "e.txt"}
core_recipes = st.fixed_dictionaries(
    {"model": st.just("builtin:tiny-llama"), "stages": st.lists(stage_entry, min_size=1, max_size=3),
     "data": st.one_of(st.just(ALL_DATA), st.just(ALL_DATA), st.fixed_dictionaries(
         {}, optional={role: st.just(path) | junk for role, path in ALL_DATA.items()}))})
recipe_extras = st.fixed_dictionaries({}, optional={
    "eval": st.just({"enabled": False}) | st.dictionaries(st.sampled_from(
        ["enabled", "task", "max_tokens", "window", "stride", "batch_size"]), junk, max_size=3),
    "bench": st.dictionaries(st.sampled_from(["enabled", "prompt_len", "threads", "warmup"]), junk, max_size=3),
    "name": junk, "quick": junk, "measure_each_stage": junk})
# Mostly the stages alone, so that most examples reach the stage checks.
recipes = st.one_of(core_recipes, core_recipes, core_recipes,
                    st.tuples(core_recipes, recipe_extras).map(lambda r: {**r[0], **r[1]}))
train_dicts = train_dict(False)


# ------------------------------------------------------------------------------------- recipe mappings

def compress_prechecks(raw, out):
    """What ``compress`` checks before it loads data or a model: the output against the inputs, the stages."""
    recipe = parse_recipe(raw)  # runs validate_stages
    lock = check_output(out, inputs=[recipe.model, *recipe_inputs(recipe)])
    del lock
    validate_stages(recipe)


@fuzz("stages")
@given(recipes)
def test_recipe_stages_raise_only_user_errors(scratch, raw):
    only_user_error(compress_prechecks, raw, scratch.parent / "out")


@fuzz("random_recipe")
@given(st.one_of(junk, st.dictionaries(st.sampled_from(["model", "data", "stages", "eval", "bench", "name",
                                                         "quick", "description", "keep_intermediate"]), junk)))
def test_random_recipe_data_raises_only_user_errors(raw):
    only_user_error(parse_recipe, raw)


CONFIGS = [cls for reg in (QUANTIZERS, PRUNERS) for cls, _ in reg.entries.values()] + \
    [ShareConfig, DistillConfig, BlockwiseConfig, ExportConfig]
python_only = st.sampled_from([float("nan"), object(), [[[[[]]]]] * 3, (1, "a"), {1, 2}]) | \
    st.sampled_from([5000, 10**5]).map(lambda e: 10**e)  # beyond what str() prints


@fuzz("configs")
@given(st.sampled_from(CONFIGS).flatmap(lambda cls: st.tuples(st.just(cls), st.fixed_dictionaries(
    {}, optional={n: st.one_of(value_for(t, False), python_only) for n, t in hints(cls).items()}))))
def test_config_classes_raise_only_user_errors(cls_kwargs):
    cls, kwargs = cls_kwargs
    only_user_error(cls, **kwargs)


# ----------------------------------------------------------------------------------------- YAML text

PIECES = ["a", "b", "0", "1", "-", "- ", ": ", " ", "\n", "\n  ", "[", "]", "{", "}", ", ", "&x ", "*x", "&y ", "*y",
          "!!python/object:os.system ", "!!python/name:os.system ", "!!python/object/apply:os.system [id]",
          "!!binary ", "!!set ", "!!omap ", "!!int ", "!!float ", "!!str ", "!!bool ", "!!timestamp ", "!!null ",
          "!local ", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n", "# c\n", "'", '"', "|\n", ">\n", "? ",
          "<<: ", "~", "null", "yes", "1e400", "1.0e400", ".inf", ".nan", "0x1F", "0o17", "0b101", "1:30", "2:4",
          "2020-01-01", "2001-12-14t21:59:43.10-05:00", "9" * 40, "-" + "9" * 400, "\t", "\x00", "\ufeff", "é", "✓",
          "\U0001F600", "stages", "prune", "quantize", "method: wanda", "sparsity", "model", "data", "eval", "train",
          "optim", "lr", "batch", "max_steps"]
token_text = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=80).map("".join)


def _dump(data) -> str:
    try:
        return yaml.safe_dump(data, sort_keys=False)
    except (yaml.YAMLError, ValueError):
        return "{}"


def _bomb(depth: int, width: int) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "\n".join(lines) + "\nstages: [export]\n"


def _mutate(pair) -> str:
    text, (pos, piece) = pair
    pos = pos % (len(text) + 1)
    return text[:pos] + piece + text[pos:]


yaml_texts = st.one_of(
    token_text,
    recipes.map(_dump),
    st.tuples(recipes.map(_dump), st.tuples(st.integers(0, 10**6), st.sampled_from(PIECES))).map(_mutate),
    st.tuples(st.integers(1, 12), st.integers(1, 12)).map(lambda dw: _bomb(*dw)),
    # Deep nesting (PyYAML gives up near 1000 levels, after ~2 s: test_deep_nesting_is_refused covers that).
    st.tuples(st.integers(1, 300), st.sampled_from(["[", "{a: ", "- "])).map(lambda np: np[1] * np[0]),
    st.integers(1, 300).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 4000).map(lambda n: "stages: [export]\nmodel: " + "9" * n),
    st.just("a: &a [*a]\n"),
)
yaml_bytes = st.one_of(yaml_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
                       st.binary(max_size=64), st.just(b"\xff\xfe\x00a: 1"))
override_keys = st.lists(st.sampled_from(["stages", "0", "1", "9", "prune", "quantize", "distill", "method", "sparsity",
                                          "eval", "bench", "max_tokens", "data", "model", "name", "quick", "", "²",
                                          "٣", "9" * 20, "-1", "x", "optim", "lr", "batch", "batch_size"]),
                         min_size=1, max_size=5).map(".".join)
override_values = st.one_of(token_text, st.sampled_from(PIECES), st.just("[" * 200), st.integers().map(str))
overrides = st.lists(st.one_of(st.tuples(override_keys, override_values).map("=".join), st.text(max_size=10)),
                     max_size=4)


@fuzz("recipe_yaml")
@given(yaml_bytes, overrides, st.booleans())
def test_recipe_yaml_text_raises_only_user_errors(scratch, data, items, quick):
    scratch.write_bytes(data)
    only_user_error(load_recipe_file, scratch, items, quick=quick)


@fuzz("train_yaml")
@given(yaml_bytes, overrides)
def test_train_yaml_text_raises_only_user_errors(scratch, data, items):
    scratch.write_bytes(data)
    only_user_error(TrainConfig.from_yaml, scratch, items)


BASE = {"model": "builtin:tiny-llama", "data": {"eval": "e.txt", "calibration": "c.txt", "train": "t.txt"},
        "stages": ["share", {"prune": {"method": "wanda", "sparsity": 0.5}},
                   {"distill": {"student_layers": 2, "train": {"max_steps": 2}}},
                   {"quantize": {"method": "rtn"}}, "export"]}


@fuzz("recipe_overrides")
@given(overrides)
def test_recipe_overrides_raise_only_user_errors(items):
    def run():
        parse_recipe(apply_overrides(BASE, items))
    only_user_error(run)


@fuzz("train_dict")
@given(train_dicts, overrides)
def test_train_config_dict_raises_only_user_errors(data, items):
    only_user_error(TrainConfig.from_dict, data, items)


# ------------------------------------------------------------------------------------- pinned cases

def test_deep_nesting_is_refused(tmp_path):
    for text in ("[" * 200_000, "stages: " + "[" * 2000 + "]" * 2000):
        (tmp_path / "deep.yaml").write_text(text)
        with pytest.raises(UserError, match="nests"):
            load_recipe_file(tmp_path / "deep.yaml")


def test_mistyped_recipe_values_name_the_key_and_type():
    base = {"model": "m", "data": {"eval": "e", "calibration": "c", "train": "t"}}
    cases = [({"prune": {"method": "wanda", "sparsity": "half"}}, "sparsity must be a number, got 'half'"),
             ({"prune": {"method": "wanda", "targets": "*.mlp.*"}}, "targets must be a list of strings"),
             ({"prune": {"method": "magnitude", "n_m": 124}}, "quote it"),
             ({"prune": {"method": "wanda", "overrides": [["*.down_proj"]]}}, r"overrides\[0\]"),
             ({"prune": {"method": "wanda", "ignore": ["re:("]}}, "not a valid regular expression"),
             ({"prune": {"method": ["wanda"]}}, "unknown pruning method"),
             ({"prune": {"method": "layers", "drop": True}}, "drop must be an integer or null, got True"),
             ({"quantize": {"method": "rtn", "bits": 4.5}}, "bits must be an integer, got 4.5"),
             ({"quantize": {"method": "gptq", "damp": float("nan")}}, "damp must be a finite number"),
             ({"quantize": {"method": "rtn", "group_size": 10**30}}, "group_size must be an integer or null"),
             ({"quantize": {"method": "smoothquant", "batch_size": 0}}, "batch_size must be >= 1"),
             ({"quantize": {"method": "rtn", "seq_len": "long"}}, "seq_len must be an integer"),
             ({"share": {"init": ["mean"]}}, "init must be a string"),
             ({"export": {"format": None}}, "format must be a string"),
             ({"finetune": {"keep_sparsity": "false"}}, "keep_sparsity must be true or false"),
             ({"distill": {"teacher": ["a"]}}, "teacher must be a string"),
             ({"distill": {"student_layers": -1}}, "student_layers must be K >= 1"),
             ({"distill": {"layer_map": [[1, float("inf")]]}}, "layer_map must be"),
             ({"distill": {"alpha": 10**400}}, "alpha must be a finite number"),
             ({"distill": {"student_layers": 2, "blockwise": {"epochs": "4"}}}, "blockwise.epochs must be an integer"),
             ({"prune": {"method": "wanda", 1: 2}}, "option names are strings"),
             ({True: {}}, "stage name must be a string")]
    for stage, message in cases:
        with pytest.raises(UserError, match=message):
            parse_recipe({**base, "stages": [stage]})


def test_student_layers_list_names_the_kept_layers():
    base = {"model": "m", "data": {"eval": "e", "train": "t"}}
    for value, parsed in ((2, 2), ("2", 2), ([2], [2]), ("0,2,4", [0, 2, 4]), ([0, 3], [0, 3])):
        stage, = validate_stages(parse_recipe({**base, "stages": [{"distill": {"student_layers": value}}]}))
        assert stage.student_layers == parsed


def test_overrides_into_values_and_odd_indices_are_user_errors():
    for item, message in (("stages.0.format=hf", "is a value, not a section"), ("stages.²=x", "no list item"),
                          ("stages.99999999999999999999.a=1", "has no item"), ("model.x=1", "not a section")):
        with pytest.raises(UserError, match=message):
            apply_overrides({"model": "m", "stages": ["export"]}, [item])


def _recipe_text(text: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "r.yaml").write_text(text)
        return load_recipe_file(Path(d) / "r.yaml")


@pytest.mark.parametrize("case", [
    pytest.param(lambda: _recipe_text("model: !!int\n"), id="yaml-empty-int-tag"),
    pytest.param(lambda: _recipe_text("model: !!timestamp x\n"), id="yaml-bad-timestamp-tag"),
    pytest.param(lambda: apply_overrides({}, ["model=!!bool maybe"]), id="override-bad-bool-tag"),
    pytest.param(lambda: _recipe_text("model: \x1f\n"), id="yaml-control-character"),
    pytest.param(lambda: TrainConfig.from_dict({"max_steps": float("inf")}), id="trainconfig-int-inf"),
    pytest.param(lambda: TrainConfig.from_dict({"max_steps": float("nan")}), id="trainconfig-int-nan"),
    pytest.param(lambda: TrainConfig.from_dict({"optim": {"lr": 10**400}}), id="trainconfig-float-huge-int"),
    pytest.param(lambda: TrainConfig.from_dict({"seed": 2**63}), id="trainconfig-huge-seed"),
    pytest.param(lambda: TrainConfig.from_dict({"optim": {"lr": float("inf")}}), id="trainconfig-inf-lr"),
])
def test_fuzz_findings_are_user_errors(case):
    """Cases the fuzzing found (YAML tags PyYAML cannot build, non-finite or huge numbers): clean errors now."""
    with pytest.raises(UserError) as e:
        case()
    assert "\n" not in str(e.value) and len(str(e.value)) <= MAX_MESSAGE