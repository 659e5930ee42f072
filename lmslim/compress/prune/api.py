"""One in-place entry point for every pruning method: ``prune_(model, Config(...), calib)``.

Each method is a frozen config dataclass (validated in ``__post_init__``) plus a handler registered
under the method's name in ``PRUNERS``; the CLI and recipes look methods up by that name.

Two kinds of method live here:

- *unstructured / semi-structured* (``magnitude``, ``wanda``, ``sparsegpt``): weights are set to
  zero inside dense matrices. Shapes do not change; the zeros only save space when the model is
  saved compressed (``lmslim.modelio.formats``) and save no time on dense kernels.
- *structured* (``heads``, ``neurons``, ``layers``): rows, columns or whole blocks are removed, so
  the matrices physically shrink and every device runs the model faster.

Example:
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.prune import prune_, MagnitudeConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> report = prune_(model, MagnitudeConfig(sparsity=0.5))
    >>> round(report["sparsity"], 3)
    0.5
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmslim.core.configs import MAX_INT, check_fields, check_patterns, check_value, show
from lmslim.core.errors import UserError
from lmslim.core.registry import Registry
from lmslim.core.targeting import matches, select_linears

PRUNERS = Registry("pruning")


def parse_n_m(value: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``"2:4"`` or ``[2, 4]`` → ``(2, 4)``: keep N weights in every group of M consecutive inputs."""
    if value is None:
        return None
    pair = None
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,6}\s*:\s*\d{1,6}\s*", value):
        pair = tuple(int(p) for p in value.split(":"))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(p, int) and not isinstance(p, bool) and abs(p) <= MAX_INT for p in value):
        pair = tuple(value)
    if pair is None:
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
            hint = " (YAML reads an unquoted 2:4 as the base-60 number 124: quote it, n_m: '2:4')"
        raise UserError(f"N:M pattern must look like 2:4 or [2, 4], got {show(value)}{hint}")
    return pair


def _check_overrides(overrides: tuple) -> tuple[tuple[str, float], ...]:
    """Per-matrix sparsity: ``[[pattern, sparsity], ...]`` → a tuple of checked pairs."""
    pairs = tuple(check_value(item, tuple[str, float], f"overrides[{i}] ([pattern, sparsity])")
                  for i, item in enumerate(overrides))
    check_patterns(tuple(p for p, _ in pairs), "overrides pattern")
    return pairs


@dataclass(frozen=True)
class SparsitySpec:
    """What every unstructured / N:M method shares: how much to prune and where.

    Args:
        sparsity: fraction of weights set to zero in each targeted matrix, in [0, 1).
        n_m: ``(N, M)`` or ``"N:M"``: keep the N largest-scoring of every M consecutive weights in a
            row (2:4 is what sparse tensor cores accelerate). Replaces ``sparsity``.
        overrides: ``((pattern, sparsity), ...)``: per-matrix sparsity by module-name glob (first
            match wins), e.g. ``(("*.mlp.down_proj", 0.3),)``.
        targets / ignore: module-name globs (``lmslim.core.targeting``).
        include_lm_head: prune the LM head too (off: it is usually tied to the input embedding).
    """

    sparsity: float = 0.5
    n_m: Any = None
    overrides: tuple = ()
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    include_lm_head: bool = False

    def _check_sparsity(self) -> None:
        check_fields(self)  # types first: every rule below (and in the subclasses) may trust them
        check_patterns(self.targets, "targets")
        check_patterns(self.ignore, "ignore")
        object.__setattr__(self, "overrides", _check_overrides(self.overrides))
        object.__setattr__(self, "n_m", parse_n_m(self.n_m))
        check_fraction("sparsity", self.sparsity)
        for pattern, s in self.overrides:
            check_fraction(f"sparsity for {pattern!r}", s)
        if self.n_m is not None:
            n, m = self.n_m
            if not 0 < n < m:
                raise UserError(f"N:M pattern {n}:{m} needs 0 < N < M (N weights kept in every M)")
            if self.overrides:
                raise UserError("per-layer sparsity overrides do not combine with an N:M pattern")

    def sparsity_for(self, name: str) -> float:
        if self.n_m is not None:
            return 1 - self.n_m[0] / self.n_m[1]
        for pattern, s in self.overrides:
            if matches(name, pattern):
                return s
        return self.sparsity


def check_fraction(what: str, value: float) -> None:
    if not 0 <= value < 1:
        raise UserError(f"{what} must be in [0, 1), got {value}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (a view: writes go through)."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w


def sparse_targets(model: nn.Module, cfg: SparsitySpec) -> dict[str, nn.Module]:
    found = dict(select_linears(model, cfg.targets, cfg.ignore, cfg.include_lm_head))
    if not found:
        raise UserError("no eligible layers: no Linear/Conv1D module matches the targets "
                        f"{list(cfg.targets)} outside ignore {list(cfg.ignore)}")
    if cfg.n_m is not None:
        m = cfg.n_m[1]
        bad = [n for n, mod in found.items() if linear_weight(mod).shape[1] % m]
        if bad:
            raise UserError(f"N:M with M={m} needs input widths divisible by {m}; {bad[0]} has "
                            f"{linear_weight(found[bad[0]]).shape[1]} (exclude it with --ignore)")
    return found


def keep_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None,
              per_row: bool = False) -> torch.Tensor:
    """Boolean mask (True = keep) that drops the lowest ``scores`` of an (out, in) matrix.

    Exactly ``round(sparsity · count)`` entries are dropped per comparison group: the whole matrix,
    each row (``per_row``), or each run of M consecutive inputs of a row (``n_m``, dropping M − N).
    Ties are broken by position, so the count is exact even when many scores are equal.
    """
    out, k = scores.shape
    keep = torch.ones(out, k, dtype=torch.bool)
    if n_m is not None:
        n, m = n_m
        groups = scores.reshape(out, k // m, m)  # (out, in/M, M)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        keep.view(out, k // m, m).scatter_(-1, drop, False)
    elif per_row:
        n_drop = round(sparsity * k)
        if n_drop:
            keep.scatter_(1, scores.topk(n_drop, dim=1, largest=False).indices, False)
    else:
        n_drop = round(sparsity * out * k)
        if n_drop:
            keep.view(-1)[scores.reshape(-1).topk(n_drop, largest=False).indices] = False
    return keep


def zero_fraction(model: nn.Module, names: list[str]) -> tuple[float, dict[str, float]]:
    per = {}
    zeros = total = 0
    for name in names:
        w = linear_weight(model.get_submodule(name))
        z = int((w == 0).sum())
        per[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return zeros / max(total, 1), per


def prune_(model: nn.Module, config: Any, calib: torch.Tensor | None = None) -> dict[str, Any]:
    """Prune ``model`` in place with the method ``config`` names.

    Args:
        model: a transformers model in full precision (not quantized).
        config: a registered method config: ``MagnitudeConfig``, ``WandaConfig``, ``SparseGPTConfig``,
            ``HeadsConfig``, ``NeuronsConfig`` or ``LayersConfig``.
        calib: (n_samples, seq_len) token ids for methods that calibrate (see ``lmslim.data.calib``).

    Returns:
        A report: method name, seconds, and method-specific figures (sparsity reached, what was
        removed, parameters before/after).

    Raises:
        UserError: bad settings, a quantized model, or calibration data missing.
    """
    if getattr(model.config, "lmslim_quantization", None):
        raise UserError("the model is quantized; prune the full-precision model, then quantize")
    name, handler = PRUNERS.handler_for(config)
    if getattr(config, "needs_calibration", False) and (calib is None or calib.numel() == 0):
        raise UserError(f"{name} needs calibration data (--calib SPEC)")
    params_before = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    with torch.no_grad():
        report = handler(model, config, calib)
    report = {"method": name, "seconds": time.perf_counter() - t0, **report,
              "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters())}
    if calib is not None and getattr(config, "needs_calibration", False):
        report["calibration"] = {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}
    # Provenance in the config (saved with the model): bench reads it to state what a pattern buys.
    record = dict(getattr(model.config, "lmslim_pruning", None) or {"steps": []})
    step = {"method": name, "config": _plain(dataclasses.asdict(config))}
    record["steps"] = list(record.get("steps", [])) + [step]
    if getattr(config, "n_m", None):
        record["n_m"] = f"{config.n_m[0]}:{config.n_m[1]}"
    model.config.lmslim_pruning = record
    return report


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
