"""Magnitude pruning: zero the weights with the smallest |w|, per matrix or across the whole model.

The baseline every calibrated method is compared against (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", https://arxiv.org/abs/1506.02626). Needs no data.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.prune import prune_, MagnitudeConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> prune_(model, MagnitudeConfig(n_m="2:4"))["sparsity"]
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmslim.compress.prune.api import PRUNERS, SparsitySpec, keep_mask, linear_weight, sparse_targets, zero_fraction
from lmslim.core.errors import UserError


@dataclass(frozen=True)
class MagnitudeConfig(SparsitySpec):
    """Magnitude pruning.

    Args:
        scope: ``layer`` (each matrix loses ``sparsity`` of its weights) or ``global`` (one |w|
            threshold over all targeted matrices, so matrices with small weights lose more).
    """

    scope: str = "layer"

    def __post_init__(self) -> None:
        self._check_sparsity()
        if self.scope not in ("layer", "global"):
            raise UserError(f"magnitude scope must be layer or global, got {self.scope!r}")
        if self.scope == "global" and (self.n_m is not None or self.overrides):
            raise UserError("global magnitude pruning takes one sparsity: no N:M pattern or per-layer overrides")


@PRUNERS.register("magnitude", MagnitudeConfig)
def _magnitude(model, config: MagnitudeConfig, _calib) -> dict:
    targets = sparse_targets(model, config)
    if config.scope == "global":
        weights = [linear_weight(m) for m in targets.values()]
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        k = round(config.sparsity * flat.numel())
        if k:
            threshold = flat.kthvalue(k).values
            for w in weights:
                w.masked_fill_(w.abs() <= threshold, 0)  # +0.0: mul_ would leave -0.0, which is stored
    else:
        for name, mod in targets.items():
            w = linear_weight(mod)
            w.masked_fill_(~keep_mask(w.abs(), config.sparsity_for(name), config.n_m), 0)
    total, per = zero_fraction(model, list(targets))
    return {"sparsity": total, "modules": len(targets), "module_sparsity": per}
