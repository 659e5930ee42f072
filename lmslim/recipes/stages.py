"""Recipe stages: each technique family registers a stage under its recipe name.

A stage turns one saved model folder into another. ``parse`` validates the stage's options into the
technique's own config object (so a recipe key is exactly a config field), ``run`` applies it to a
loaded model in place. ``validate_stages`` checks the order and the data a recipe's stages need
before anything heavy runs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmslim.core.configs import check_fields, show
from lmslim.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage may use besides the model: the recipe's data roles and the runtime."""

    recipe: Any
    runtime: Any
    work_dir: Path  # a scratch folder for this stage (checkpoints, caches)
    input_spec: str = ""  # the model the recipe started from (the default distillation teacher)
    # A one-stage run whose work_dir is the user's training folder (``lmslim distill --out``):
    resume: bool = False  # continue from work_dir's latest checkpoint
    resume_changes: tuple = ()  # training-config keys allowed to differ from the checkpoint's
    clear_work_dir: bool = False  # remove work_dir's old contents right before training (--overwrite)
    trust_remote_code: bool = False  # for models a stage loads (a teacher)
    artifact_path: Path | None = None  # where an export stage writes (``lmslim export --out``; default: beside work_dir)


@dataclass(frozen=True)
class StageKind:
    """One recipe stage type.

    Attributes:
        parse: options dict → validated stage object (raises ``UserError``).
        run: ``(loaded_model, stage_object, context) -> (model, tokenizer, report)``; may return a new model.
        needs: data roles the stage reads (``calibration``, ``train``), checked before the run.
        trains: whether it changes float weights by training or pruning (impossible after quantize).
        last: whether it must be the final stage (export).
        artifact: the file or folder name the stage writes instead of a new model (an export), or None.
    """

    name: str
    summary: str
    parse: Callable[[dict], Any]
    run: Callable[..., tuple[Any, Any, dict]]
    needs: Callable[[Any], tuple[str, ...]] = lambda obj: ()
    trains: bool = True
    last: bool = False
    artifact: Callable[[Any], str | None] = lambda obj: None
    reference: Callable[[], list[tuple[str, list[tuple[str, str, str]]]]] = lambda: []


STAGES: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    if kind.name in STAGES:
        raise ValueError(f"stage {kind.name!r} registered twice")
    STAGES[kind.name] = kind
    return kind


def build_config(cls: type, options: dict, where: str, extra_keys: set[str] = frozenset()) -> Any:
    """Build a frozen config dataclass from recipe options with helpful errors (see ``lmslim.core.configs``)."""
    from lmslim.core.configs import build_config as build

    return build(cls, options, where, extra_keys)


def config_reference(cls: type) -> list[tuple[str, str, str]]:
    """(field, type, default) rows of a config dataclass, for the generated recipe reference."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "needs_calibration":
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        rows.append((f.name, str(f.type).replace("typing.", ""), default))
    return rows


def option_names(cls: type) -> list[str]:
    """The settings of a config dataclass (its init fields, less class facts such as ``needs_calibration``)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "needs_calibration"]


def stage_keys(name: str) -> set[str]:
    """Every option key stage ``name`` documents (the generated reference's rows), nested ones dotted."""
    return {key for _, rows in STAGES[name].reference() for key, _, _ in rows}


def _int_option(options: dict, key: str, default: int, where: str) -> int:
    from lmslim.core.configs import check_value, show

    try:
        value = check_value(options.get(key, default), int, key)
    except UserError as e:
        raise UserError(f"{where}: {e}") from e
    if value < 1:
        raise UserError(f"{where}: {key} must be a positive integer, got {show(value)}")
    return value


# ---------------------------------------------------------------------------------------------- quantize

@dataclass(frozen=True)
class QuantizeStage:
    config: Any
    calib_samples: int
    seq_len: int


CALIBRATION_KEYS = ("calib_samples", "seq_len")


def parse_method_stage(registry, options: dict, stage: str) -> tuple[Any, int, int]:
    """Options of a stage that picks a method from ``registry``: (config, calib_samples, seq_len)."""
    where = f"stage {stage}"
    if not isinstance(options, dict):
        raise UserError(f"{where}: options must be a mapping like {{method: ...}}, got {show(options)}")
    method = options.get("method")
    if method is None:
        raise UserError(f"{where}: 'method' is required ({', '.join(registry.names())})")
    cls = registry.config_class(method)
    own = set(option_names(cls)) | {"method", *CALIBRATION_KEYS}
    for key in options:
        # A key another method takes is a misplaced option, not a typo: say so instead of "did you mean".
        if key not in own and any(key in option_names(c) for c, _ in registry.entries.values()):
            raise UserError(f"{where} ({method}): option {show(key)} does not apply to {method} "
                            f"(its options: {', '.join(sorted(own))})")
    config = build_config(cls, options, f"{where} ({method})", {"method", *CALIBRATION_KEYS})
    return (config, _int_option(options, "calib_samples", 128, where), _int_option(options, "seq_len", 512, where))


def _parse_quantize(options: dict) -> QuantizeStage:
    from lmslim.compress.quantize import QUANTIZERS

    if isinstance(options, dict) and "bits" in options:
        options = dict(options)
        # 8 bits defaults to symmetric per-channel (the int8 convention), fewer bits to asymmetric g128.
        if options["bits"] == 8:
            options.setdefault("group_size", None)
            options.setdefault("symmetric", True)
    if isinstance(options, dict) and type(options.get("group_size")) is int and options["group_size"] == 0:
        options = dict(options, group_size=None)  # 0 and null both mean one scale per output channel
    return QuantizeStage(*parse_method_stage(QUANTIZERS, options, "quantize"))


def calibration_for(lm, ctx: StageContext, samples: int, seq_len: int):
    from lmslim.data.calib import calibration_ids
    from lmslim.data.spec import load_data

    docs = load_data(ctx.recipe.data.calibration, task="clm").documents
    return calibration_ids(lm.tokenizer, docs, samples, seq_len)


def _run_quantize(lm, stage: QuantizeStage, ctx: StageContext):
    from lmslim.compress.quantize import quantize_

    calib = None
    if getattr(stage.config, "needs_calibration", False):
        calib = calibration_for(lm, ctx, stage.calib_samples, stage.seq_len)
    report = quantize_(lm.model, stage.config, calib)
    return lm.model, lm.tokenizer, report


def method_reference(registry) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Reference sections of a method stage: ``method`` itself, then each method's options."""
    sections = [("", [("method", "str", "required: " + " / ".join(registry.names()))])]
    for name, (cls, _) in registry.entries.items():
        rows = config_reference(cls)
        if getattr(cls, "needs_calibration", False):
            rows += [("calib_samples", "int", "128"), ("seq_len", "int", "512")]
        sections.append((f"method: {name}", rows))
    return sections


def _quantize_reference():
    from lmslim.compress.quantize import QUANTIZERS

    return method_reference(QUANTIZERS)


register_stage(StageKind(
    name="quantize", summary="quantize weights (and activations for W8A8 methods); must come after every "
    "training/pruning stage. Calibrated methods also take calib_samples (128) and seq_len (512). "
    "`group_size: 0` (or null) means one scale per output channel; `bits: 8` defaults to symmetric per-channel.",
    parse=_parse_quantize, run=_run_quantize,
    needs=lambda s: ("calibration",) if getattr(s.config, "needs_calibration", False) else (),
    trains=False, reference=_quantize_reference))


# ------------------------------------------------------------------------------------------------ export

ARTIFACTS = {"gguf": "model.gguf", "onnx": "model-onnx"}  # what an export stage writes, by format


def _run_export(lm, stage, ctx: StageContext):
    """``hf``: the folder every stage writes is already the hand-off; others write ``ARTIFACTS[format]``."""
    from lmslim.compress.export import export_
    from lmslim.modelio.export import get_exporter

    if stage.format == "hf":
        return lm.model, lm.tokenizer, {"format": "hf"}
    calib = calibration_for(lm, ctx, stage.calib_samples, stage.seq_len) if stage.needs_calibration else None
    name = ARTIFACTS[stage.format]
    report = export_(lm.model, lm.tokenizer, stage, ctx.artifact_path or ctx.work_dir.parent / name, calib)
    return lm.model, lm.tokenizer, {**report, "artifact": name, "engine": get_exporter(stage.format).engine}


def _parse_export(options: dict):
    from lmslim.compress.export import ExportConfig

    return build_config(ExportConfig, options, "stage export")


def _export_reference():
    from lmslim.compress.export import ExportConfig

    return [("", config_reference(ExportConfig))]


register_stage(StageKind(
    name="export", summary="the hand-off: hf (the model folder), gguf (llama.cpp) or onnx (ONNX Runtime), measured "
    "in that engine; float weights rounded on the format's grid (method rtn, or gptq / awq / awq_gptq on the "
    "calibration data, gguf); "
    "must be the last stage",
    parse=_parse_export, run=_run_export, trains=False, last=True,
    needs=lambda s: ("calibration",) if s.needs_calibration else (),
    artifact=lambda s: ARTIFACTS.get(s.format), reference=_export_reference))


def _load_optional_stages() -> None:
    """Technique families that ship their own stage adapters register them on import."""
    import importlib

    for mod in ("lmslim.recipes.stage_prune", "lmslim.recipes.stage_train"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_load_optional_stages()


def validate_stages(recipe) -> list[Any]:
    """Parse every stage's options and check the order and data needs; returns the stage objects."""
    objs = []
    quantized_at = None
    for i, spec in enumerate(recipe.stages):
        kind = STAGES.get(spec.name)
        if kind is None:
            from lmslim.recipes.schema import did_you_mean

            raise UserError(f"recipe: unknown stage {spec.name!r}{did_you_mean(spec.name, set(STAGES))}")
        obj = kind.parse(spec.options)
        if kind.last and i != len(recipe.stages) - 1:
            raise UserError(f"recipe: stage {i} ({spec.name}) must be the last stage")
        if kind.trains and quantized_at is not None:
            raise UserError(f"recipe: stage {i} ({spec.name}) cannot run after quantize (stage {quantized_at}): "
                            "quantized weights cannot be pruned or trained; move quantize later")
        if spec.name == "quantize":
            if quantized_at is not None:
                raise UserError(f"recipe: stages {quantized_at} and {i} both quantize; a model is quantized once")
            quantized_at = i
        for role in kind.needs(obj):
            if getattr(recipe.data, role) is None:
                raise UserError(f"recipe: stage {i} ({spec.name}) needs data.{role}, which the recipe does not set")
        objs.append(obj)
    if recipe.eval.enabled and recipe.data.eval is None:
        raise UserError("recipe: eval is enabled but data.eval is not set (set it, or eval: {enabled: false})")
    return objs
