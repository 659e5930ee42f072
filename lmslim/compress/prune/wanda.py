"""Wanda: prune by |weight| × input-activation norm, compared within each output row.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
https://arxiv.org/abs/2306.11695. The score of weight W_ij is ``|W_ij| · ‖X_j‖₂``, where ``X_j`` is
input feature j over all calibration tokens: a small weight on a feature with large activations
(LLMs have a few such outlier features) still matters. Weights compete only with the other weights
of their output row. No weight update, so it costs one forward pass per block.

Calibration runs block by block (``lmslim.compress.calibration.sequential``): each block's input
norms come from what the already-pruned blocks before it produce.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.prune import prune_, WandaConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> prune_(model, WandaConfig(sparsity=0.5), torch.randint(10, 200, (4, 32)))["sparsity"]
    0.5
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmslim.compress.calibration import InputStats, run_block, sequential, transformer_blocks
from lmslim.compress.prune.api import PRUNERS, SparsitySpec, keep_mask, linear_weight, sparse_targets
from lmslim.core.errors import UserError
from lmslim.core.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandaConfig(SparsitySpec):
    """Wanda. ``batch_size``: calibration samples per forward pass."""

    batch_size: int = 8
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        self._check_sparsity()
        if self.batch_size < 1:
            raise UserError("batch_size must be >= 1")


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X_j‖₂`` for weight (out, in) and the per-input sum of squares (in,)."""
    return weight.abs() * sq_norm.sqrt().unsqueeze(0)


def prune_outside_blocks(model, config: SparsitySpec, names: list[str], method: str) -> None:
    """Matrices outside the transformer blocks (an LM head) get magnitude pruning: no block inputs."""
    for name in names:
        w = linear_weight(model.get_submodule(name))
        w.masked_fill_(~keep_mask(w.abs(), config.sparsity_for(name), config.n_m, per_row=True), 0)
    if names:
        log.info("%s: %d module(s) outside the transformer blocks used magnitude scores: %s", method, len(names), names)


def sparsity_summary(model, names: list[str], counted: dict[str, tuple[int, int]]) -> tuple[float, dict[str, float]]:
    """``zero_fraction`` of ``names``, with the (zeros, size) counted while each block was in memory.

    A streamed model's blocks are gone (on the meta device) once the loop ends, so their counts are
    taken inside the loop; modules outside the blocks are still in memory and counted here.
    """
    counts = dict(counted)
    for n in names:
        if n not in counts:
            w = linear_weight(model.get_submodule(n))
            counts[n] = (int((w == 0).sum()), w.numel())
    per = {n: counts[n][0] / counts[n][1] for n in names}
    zeros, total = sum(counts[n][0] for n in names), sum(counts[n][1] for n in names)
    return zeros / max(total, 1), per


@PRUNERS.register("wanda", WandaConfig)
def _wanda(model, config: WandaConfig, calib: torch.Tensor) -> dict:
    targets = sparse_targets(model, config)
    zeros: dict[str, tuple[int, int]] = {}

    def compress_block(_path, block, mods, inputs):
        sq = {n: torch.zeros(linear_weight(m).shape[1]) for n, m in mods.items()}

        def update(name, x):  # x: (N, in)
            sq[name] += (x * x).sum(0)

        stats = InputStats(mods, update)
        try:
            for inp in inputs:
                run_block(block, inp)
        finally:
            stats.remove()
        for name, mod in mods.items():
            w = linear_weight(mod)
            keep = keep_mask(wanda_scores(w, sq[name]), config.sparsity_for(name), config.n_m, per_row=True)
            w.masked_fill_(~keep, 0)  # +0.0 (mul_ would leave -0.0, which the sparse format must store)
            zeros[name] = (int((w == 0).sum()), w.numel())

    _, blocks = transformer_blocks(model)
    for _ in track(sequential(model, calib, set(targets), config.batch_size, compress_block), "Wanda blocks",
                   total=len(blocks)):
        pass
    leftovers = [n for n in targets if n not in zeros]
    prune_outside_blocks(model, config, leftovers, "Wanda")
    total, per = sparsity_summary(model, list(targets), zeros)
    return {"sparsity": total, "modules": len(targets), "module_sparsity": per, "magnitude_modules": leftovers}
