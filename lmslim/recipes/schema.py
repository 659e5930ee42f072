"""Recipes: one YAML file (or the same objects in Python) that says what to compress and how to measure it.

A recipe names the model, the data for each role, an ordered list of stages and the measurement
settings::

    model: builtin:smollm2-135m
    data:
      calibration: builtin:wiki:train
      eval: builtin:wiki:test
    stages:
      - prune: {method: wanda, sparsity: 0.5}
      - quantize: {method: dynamic-int8}
    eval: {max_tokens: 8192}
    bench: {gen_len: 32}

Each stage is a one-key mapping ``{stage_name: options}``; the options are the fields of the
technique's own config class (``GPTQConfig``, ``WandaConfig``, …), so a recipe and a Python call
accept exactly the same names. Unknown keys anywhere are refused with a "did you mean" hint, and
``key=value`` overrides (``stages.0.prune.sparsity=0.6``) are applied before validation.

Example:
    >>> from lmslim.recipes.schema import parse_recipe
    >>> r = parse_recipe({"model": "builtin:tiny-llama", "data": {"eval": "builtin:wiki:test"},
    ...                   "stages": [{"quantize": {"method": "dynamic-int8"}}]})
    >>> r.stages[0].name, r.stages[0].options["method"]
    ('quantize', 'dynamic-int8')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmslim.core.configs import MAX_INT, did_you_mean, show  # noqa: F401 - did_you_mean: recipe modules import it here
from lmslim.core.errors import UserError
from lmslim.core.safeyaml import parse_value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataRoles(_Strict):
    """Data spec per role (any spec ``lmslim eval --data`` accepts)."""

    train: Optional[str] = Field(None, description="training text/examples (finetune, distill)")
    validation: Optional[str] = Field(None, description="held-out data for early stopping during training")
    calibration: Optional[str] = Field(None, description="text for calibrated one-shot methods (GPTQ, Wanda, …)")
    eval: Optional[str] = Field(None, description="held-out data for the quality measurement")


class EvalSettings(_Strict):
    """Quality measurement after each stage (see ``lmslim eval``)."""

    enabled: bool = Field(True, description="measure quality at all")
    task: Literal["clm", "seq-cls", "token-cls", "embed"] = Field("clm", description="task the model serves")
    max_tokens: Optional[int] = Field(8192, ge=2, le=MAX_INT,
                                      description="clm: score only the first N tokens (null: all)")
    window: int = Field(512, ge=2, le=MAX_INT, description="clm: tokens per forward pass")
    stride: int = Field(256, ge=1, le=MAX_INT, description="clm: tokens the window advances")
    batch_size: int = Field(16, ge=1, le=MAX_INT, description="examples per batch (classification, embed)")


class BenchSettings(_Strict):
    """Cost measurement after each stage (see ``lmslim bench``)."""

    enabled: bool = Field(True, description="measure cost at all")
    prompt_len: int = Field(128, ge=1, le=MAX_INT, description="prefill tokens")
    gen_len: int = Field(32, ge=1, le=MAX_INT, description="decode steps")
    repeats: int = Field(3, ge=1, le=MAX_INT, description="measured runs (medians reported)")
    warmup: int = Field(1, ge=0, le=MAX_INT, description="unmeasured runs first")
    threads: Optional[int] = Field(None, ge=1, le=4096, description="CPU threads (null: all)")


class StageSpec(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    """A whole compression recipe."""

    name: Optional[str] = Field(None, description="label used in reports (default: the file name)")
    description: str = Field("", description="free text")
    model: Optional[str] = Field(None, description="model spec (the CLI argument wins when given)")
    data: DataRoles = Field(default_factory=DataRoles)
    stages: list[StageSpec] = Field(description="ordered stages; each a one-key mapping {stage: options}")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    measure_each_stage: bool = Field(True, description="eval + bench after every stage (else only the last)")
    keep_intermediate: bool = Field(False, description="keep every stage's model folder, not only the final one")
    quick: list[str] = Field(default_factory=list, description="key=value overrides applied with --quick "
                             "(smaller budgets for a fast look)")


_SECTIONS: dict[str, type[BaseModel]] = {"data": DataRoles, "eval": EvalSettings, "bench": BenchSettings}


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise UserError(f"recipe: unknown key {where}{show(key)}{did_you_mean(key, allowed)}")


def _stage_entries(raw: Any) -> list[StageSpec]:
    if not isinstance(raw, list) or not raw:
        raise UserError("recipe: 'stages' must be a non-empty list like [{quantize: {method: dynamic-int8}}]")
    out = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"recipe: stages[{i}] must be a one-key mapping {{stage_name: options}}, "
                            f"got {show(entry)}")
        (name, options), = entry.items()
        if not isinstance(name, str):
            raise UserError(f"recipe: stages[{i}]: the stage name must be a string, got {show(name)}")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise UserError(f"recipe: stages[{i}].{show(name)} options must be a mapping, got {show(options)}")
        for key in options:
            if not isinstance(key, str):
                raise UserError(f"recipe: stages[{i}].{show(name)}: option names are strings, got {show(key)}")
        out.append(StageSpec(name=name, options=dict(options)))
    return out


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as plain data (parsed YAML)."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping with model/data/stages, got {type(raw).__name__}")
    _check_keys(raw, set(Recipe.model_fields), "")
    for section, cls in _SECTIONS.items():
        if isinstance(raw.get(section), dict):
            _check_keys(raw[section], set(cls.model_fields), f"{section}.")
    data = dict(raw)
    data["stages"] = _stage_entries(raw.get("stages"))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{source}: {loc}: {err['msg']}") from e
    from lmslim.recipes.stages import validate_stages

    validate_stages(recipe)
    return recipe


def _list_index(part: str, node: list) -> int | None:
    """``part`` as an index into ``node`` (plain ASCII digits, in range), else None."""
    if part.isascii() and part.isdigit() and len(part) < 10 and int(part) < len(node):
        return int(part)
    return None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML scalars) to a copy of ``raw``."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise UserError(f"override {show(item)} must look like key=value (e.g. eval.max_tokens=4096)")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node: Any = raw
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = _list_index(part, node)
                if index is None:
                    raise UserError(f"override {key}: {'.'.join(parts[:j])} has no item {part}")
                node = node[index]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"override {key}: {'.'.join(parts[:j + 1])} is a value, not a section")
        leaf = parts[-1]
        parsed = parse_value(value, f"override {key[:80]}")
        if isinstance(node, list):
            index = _list_index(leaf, node)
            if index is None:
                raise UserError(f"override {key}: no list item {leaf}")
            node[index] = parsed
        else:
            node[leaf] = parsed
    return raw


def load_recipe_file(path: str | Path, overrides: list[str] = (), quick: bool = False) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe file; returns the recipe and the resolved raw mapping.

    With ``quick``, the recipe's own ``quick`` overrides apply first, then ``overrides``.
    """
    from lmslim.core.safeyaml import load_yaml_file

    p = Path(path)
    raw = load_yaml_file(p, f"recipe {path}")
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: a recipe must be a YAML mapping with model/data/stages")
    if quick:
        q = raw.get("quick") or []
        if not isinstance(q, list) or not all(isinstance(x, str) for x in q):
            raise UserError(f"recipe {path}: quick must be a list of key=value strings")
        raw = apply_overrides(raw, q)
    raw = apply_overrides(raw, list(overrides))
    raw.setdefault("name", p.stem)
    return parse_recipe(raw, source=f"recipe {p.name}"), raw
