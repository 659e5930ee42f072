"""Recipe stage ``prune``: every method of ``lmslim.compress.prune`` by its registered name.

Options are the method's config fields plus ``calib_samples`` / ``seq_len`` for calibrated methods::

    - prune: {method: wanda, sparsity: 0.5, calib_samples: 64}
    - prune: {method: neurons, fraction: 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmslim.recipes.stages import (StageContext, StageKind, calibration_for, config_reference, parse_method_stage,
                                   register_stage)


@dataclass(frozen=True)
class PruneStage:
    config: Any
    calib_samples: int
    seq_len: int


def _parse(options: dict) -> PruneStage:
    from lmslim.compress.prune import PRUNERS

    return PruneStage(*parse_method_stage(PRUNERS, options, "prune"))


def _run_stage(lm, stage: PruneStage, ctx: StageContext):
    from lmslim.compress.prune import prune_

    calib = None
    if getattr(stage.config, "needs_calibration", False):
        calib = calibration_for(lm, ctx, stage.calib_samples, stage.seq_len)
    report = prune_(lm.model, stage.config, calib)
    return lm.model, lm.tokenizer, report


def _reference():
    from lmslim.compress.prune import PRUNERS

    return [(f"method: {name}", config_reference(cls)) for name, (cls, _) in PRUNERS.entries.items()]


register_stage(StageKind(
    name="prune", summary="unstructured (magnitude, wanda, sparsegpt; N:M) or structured (heads, neurons, "
    "layers) pruning. Calibrated methods also take calib_samples (128) and seq_len (512).",
    parse=_parse, run=_run_stage,
    needs=lambda s: ("calibration",) if getattr(s.config, "needs_calibration", False) else (),
    trains=True, reference=_reference))
