"""One stage as a whole run: what ``lmslim quantize``, ``prune`` and ``share`` do with their flags.

A technique command is a one-stage recipe. Its flags become the stage's options under the same
names (``--group-size`` is the recipe key ``group_size``; a flag left out is a key left out, so the
config's default applies on both paths), which go through the same ``validate_stages`` (the
stage's ``parse``) and the same ``StageKind.run`` as ``lmslim compress``. Only the output differs:
one model folder (``save_model``, written atomically) with the stage's report as
``lmslim_<stage>.json``, instead of a measured run.

Example:
    >>> from lmslim.recipes.single import single_stage_recipe
    >>> recipe, stage = single_stage_recipe("quantize", {"method": "rtn", "bits": 8}, "builtin:tiny-llama")
    >>> stage.config.group_size is None, stage.config.symmetric
    (True, True)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def cli_options(values: dict[str, Any]) -> dict[str, Any]:
    """Stage options from flag values: flags not given (``None``, an empty repeatable) are left out."""
    options = {}
    for key, value in values.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        options[key] = list(value) if isinstance(value, tuple) else value
    return options


def single_stage_recipe(stage: str, options: dict, model: str, data: dict[str, str | None] | None = None,
                        task: str = "clm") -> tuple[Any, Any]:
    """The recipe ``{model, data, stages: [{stage: options}]}`` (measurement off) and its parsed stage object.

    Raises ``UserError`` exactly where ``lmslim compress`` would for the same stage options.
    """
    from lmslim.recipes.schema import parse_recipe
    from lmslim.recipes.stages import validate_stages

    raw = {"model": model, "data": {k: v for k, v in (data or {}).items() if v is not None},
           "stages": [{stage: options}], "eval": {"enabled": False, "task": task}, "bench": {"enabled": False}}
    recipe = parse_recipe(raw, source=f"{stage} options")
    (obj,) = validate_stages(recipe)
    return recipe, obj


def run_single_stage(recipe: Any, obj: Any, out: Path, runtime: Any, *, trust_remote_code: bool = False,
                     dense: bool = False) -> dict[str, Any]:
    """Load the recipe's model, run its one stage, save the result into ``out`` (atomically); returns the report.

    The report is the stage's own (what ``lmslim compress`` records in ``stage.json``) plus the input's
    identity, sizes, peak memory and time; it is also written to ``out/lmslim_<stage>.json``.
    The caller checks ``out`` first (``lmslim.core.guard.check_output``).
    """
    from lmslim.core.io import atomic_dir, atomic_write_json
    from lmslim.measure.bench import peak_rss_mb
    from lmslim.modelio import load_model, save_model
    from lmslim.recipes.stages import STAGES, StageContext

    out = Path(out)
    name = recipe.stages[0].name
    t0 = time.perf_counter()
    lm = load_model(recipe.model, task=recipe.eval.task, dtype=runtime.dtype, device=runtime.device,
                    trust_remote_code=trust_remote_code)
    size_before, weights = lm.resolved.size_bytes(), lm.resolved.weights_hash()
    # Scratch for a stage that wants one (checkpoints) in the system's temporary folder: a killed run
    # must not leave anything beside the output.
    with tempfile.TemporaryDirectory(prefix="lmslim-stage-") as scratch:
        ctx = StageContext(recipe=recipe, runtime=runtime, work_dir=Path(scratch), input_spec=recipe.model)
        model, tokenizer, report = STAGES[name].run(lm, obj, ctx)
        with atomic_dir(out) as tmp:
            fmt = save_model(model, tokenizer, tmp, dense=dense)
            size_after = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
            report = dict(report or {})
            report.update({"model": recipe.model, "weights_sha256": weights, "options": recipe.stages[0].options,
                           "format": fmt, "storage": storage(tmp), "size_mb_before": size_before / 1e6,
                           "size_mb_after": size_after / 1e6, "peak_rss_mb": peak_rss_mb(),
                           "wall_seconds": time.perf_counter() - t0})
            report.setdefault("seconds", report["wall_seconds"])
            report["calib"] = recipe.data.calibration if "calibration" in STAGES[name].needs(obj) else None
            atomic_write_json(tmp / f"lmslim_{name}.json", json.loads(json.dumps(report, default=str)))
    return report


def run_streaming_stage(recipe: Any, obj: Any, out: Path, runtime: Any, *, max_activation_mb: float | None = None
                        ) -> dict[str, Any]:
    """``run_single_stage`` for a model that need not fit in memory (``--stream``): one block loaded at a time.

    Same report and output folder contract (``lmslim.compress.streaming.stream_compress``); the input
    must be a local folder of safetensors files.
    """
    from lmslim.core.io import atomic_write_json
    from lmslim.measure.bench import peak_rss_mb
    from lmslim.modelio import resolve
    from lmslim.recipes.stages import STAGES

    name = recipe.stages[0].name
    resolved = resolve(recipe.model)
    check_stream_source(resolved)
    t0 = time.perf_counter()
    # read once for the hash and dropped from the page cache: a model larger than memory must not
    # fill the process's memory group with clean pages before the first block
    size_before, weights = resolved.size_bytes(), resolved.weights_hash(keep_cache=False)

    def finalize(tmp: Path, report: dict) -> None:
        report.update({"model": recipe.model, "weights_sha256": weights, "options": recipe.stages[0].options,
                       "format": report["streaming"]["format"], "storage": "dense", "size_mb_before": size_before / 1e6,
                       "size_mb_after": sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 1e6,
                       "peak_rss_mb": peak_rss_mb(), "wall_seconds": time.perf_counter() - t0})
        report.setdefault("seconds", report["wall_seconds"])
        report["calib"] = recipe.data.calibration if "calibration" in STAGES[name].needs(obj) else None
        atomic_write_json(tmp / f"lmslim_{name}.json", json.loads(json.dumps(report, default=str)))

    return stream_stage(recipe, name, obj, resolved.path, out, runtime, max_activation_mb=max_activation_mb,
                        finalize=finalize)


def check_stream_source(resolved: Any) -> None:
    """A streamed run reads a local folder of safetensors files (a ``ResolvedModel``); one line otherwise."""
    path = resolved.path
    if path is None or not Path(path).is_dir() or not any(Path(path).glob("*.safetensors")):
        from lmslim.core.errors import UserError

        raise UserError(f"--stream reads a local model folder of safetensors files; {resolved.spec} is not one")


def check_stream_options(stream: bool, max_activation_mb: float | None) -> None:
    """``--max-activation-mb`` is a positive bound and only means something with ``--stream``."""
    if max_activation_mb is not None and (not stream or not max_activation_mb > 0):
        from lmslim.core.errors import UserError

        raise UserError("--max-activation-mb takes a positive number of MB and applies to --stream runs only")


def stream_stage(recipe: Any, name: str, obj: Any, folder: Path, out: Path, runtime: Any, *,
                 max_activation_mb: float | None = None, finalize: Any = None) -> dict[str, Any]:
    """Stage ``name`` (a streamable quantize or prune method) from the safetensors ``folder`` into ``out``.

    One decoder block in memory at a time (``lmslim.compress.streaming.stream_compress``); calibration
    ids come from the recipe's calibration data, tokenized as the in-memory stage does.
    """
    from lmslim.compress.streaming import stream_compress
    from lmslim.recipes.stages import STAGES

    def calibration(tokenizer):
        if "calibration" not in STAGES[name].needs(obj):
            return None
        from lmslim.data.calib import calibration_ids
        from lmslim.data.spec import load_data

        docs = load_data(recipe.data.calibration, task="clm").documents
        return calibration_ids(tokenizer, docs, obj.calib_samples, obj.seq_len)

    extra = {} if max_activation_mb is None else {"max_activation_mb": max_activation_mb}
    return stream_compress(folder, name, obj.config, out, calibration, runtime=runtime, finalize=finalize, **extra)


def storage(folder: Path) -> str:
    """``bitmask+values`` when the saved weights hold sparse-compressed tensors, else ``dense``."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    qcfg = cfg.get("quantization_config") or {}
    sparse = cfg.get("lmslim_sparsity") or (qcfg.get("sparsity_config") if isinstance(qcfg, dict) else None)
    return "bitmask+values" if sparse else "dense"
