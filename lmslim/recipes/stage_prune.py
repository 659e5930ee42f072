"""Recipe stage ``prune``: every method of ``lmslim.compress.prune`` by its registered name.

Options are the method's config fields plus ``calib_samples`` / ``seq_len`` for calibrated methods::

    - prune: {method: wanda, sparsity: 0.5, calib_samples: 64}
    - prune: {method: neurons, fraction: 0.5}
    - prune: {method: magnitude, sparsity: 0.5, overrides: ["*.down_proj=0.3"]}

``lmslim prune`` builds the same options from its flags (``--overrides '*.down_proj=0.3'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmslim.core.configs import show
from lmslim.core.errors import UserError
from lmslim.recipes.stages import (StageContext, StageKind, calibration_for, method_reference, parse_method_stage,
                                   register_stage)


@dataclass(frozen=True)
class PruneStage:
    config: Any
    calib_samples: int
    seq_len: int


_STRUCTURED = ("heads", "neurons", "layers", "width")


def _parse(options: dict) -> PruneStage:
    from lmslim.compress.prune import PRUNERS

    if isinstance(options, dict):
        options = _check_combinations(options)
    return PruneStage(*parse_method_stage(PRUNERS, options, "prune"))


def _check_combinations(options: dict) -> dict:
    """Rules across keys that one config class cannot see; ``overrides`` may be ``PATTERN=FRACTION`` strings."""
    method = options.get("method")
    where = f"stage prune ({method})"
    if method in _STRUCTURED and "sparsity" in options:
        raise UserError(f"{where}: structured methods take fraction (the share of {method} removed), not sparsity")
    if "n_m" in options and "sparsity" in options:
        raise UserError(f"{where}: give either sparsity or n_m, not both (N:M fixes the sparsity at 1 - N/M)")
    if method == "width" and options.get("scope", "layer") != "layer":
        raise UserError(f"{where}: scope global does not apply to width (one hidden size for the whole model)")
    if isinstance(options.get("overrides"), (list, tuple)):
        options = dict(options, overrides=[_override(item, where) for item in options["overrides"]])
    return options


def _override(item, where: str):
    if not isinstance(item, str):
        return item
    pattern, sep, value = item.rpartition("=")
    try:
        fraction = float(value)
    except ValueError:
        sep = ""
    if not sep or not pattern:
        raise UserError(f"{where}: overrides take PATTERN=FRACTION (e.g. '*.down_proj=0.3') or [pattern, fraction], "
                        f"got {show(item)}")
    return [pattern, fraction]


def _run_stage(lm, stage: PruneStage, ctx: StageContext):
    from lmslim.compress.prune import prune_

    calib = None
    if getattr(stage.config, "needs_calibration", False):
        calib = calibration_for(lm, ctx, stage.calib_samples, stage.seq_len)
    report = prune_(lm.model, stage.config, calib)
    return lm.model, lm.tokenizer, report


def _reference():
    from lmslim.compress.prune import PRUNERS

    return method_reference(PRUNERS)


register_stage(StageKind(
    name="prune", summary="unstructured (magnitude, wanda, sparsegpt; N:M) or structured (heads, neurons, "
    "layers) pruning. Calibrated methods also take calib_samples (128) and seq_len (512).",
    parse=_parse, run=_run_stage,
    needs=lambda s: ("calibration",) if getattr(s.config, "needs_calibration", False) else (),
    trains=True, reference=_reference))
