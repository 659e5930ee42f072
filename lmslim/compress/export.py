"""Export as a technique: a model written as the file another engine runs, rounded on that engine's grid.

One config and one function serve ``lmslim export`` and the recipe stage ``export`` alike, so a flag
and a recipe key cannot mean different things. ``format: hf`` is the saved Hugging Face folder every
stage already writes; ``gguf`` (llama.cpp) and ``onnx`` (ONNX Runtime) go through the exporters of
``lmslim.modelio.export``, each with its own options dataclass: ``ExportConfig`` carries the union
of their keys, and a key the chosen format does not take is an error, not silently ignored.

``method: gptq`` calibrates float weights onto the format's own grid before writing, so the file carries
GPTQ's rounding decisions exactly. Base types q8_0/q4_0/q4_1 run lmslim's GPTQ into ``QuantLinear`` on
``gguf_blocks.grid_of`` (fp16 scales, which those blocks store as they are). Every other quantized type
(q5_0, q5_1, the k-quants and the mixes) cannot be a ``QuantLinear``: a k-quant's step ``d·sc[j]`` (fp16 ×
6-bit integer) is not an fp16 scale. There each matrix's grid is fixed first, by the writer's own RTN
search on the float weights (``gguf_blocks.type_grid``: ``w = step·q − off`` per weight, exact in f32),
and GPTQ then only chooses the integer codes on that grid (``gptq_on_grid``), column by column with the
error feedback; the file is packed from those codes and the fixed parameters, nothing re-rounded.

``method: awq`` folds AWQ's activation-aware input scales (``lmslim.compress.quantize.awq``: its scale
search and folding, norm -> q/k/v, norm -> gate/up, up -> down) into the weights and norms, each candidate
scale judged by rounding on the GGUF type the matrix is written as; then RTN (``awq``) or GPTQ
(``awq_gptq``) on the type's grid. ``o_proj``, the embedding and the LM head are never scaled: with a tied
embedding the head shares its weights with the lookup table, so no scale can be folded there.

Example:
    >>> import tempfile, pathlib
    >>> from lmslim.modelio import load_model
    >>> lm = load_model("builtin:tiny-llama")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf"
    >>> export_(lm.model, lm.tokenizer, ExportConfig(format="gguf", type="q8_0"), out)["types"]["q8_0"] > 0
    True
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmslim.core.configs import check_fields, show
from lmslim.core.errors import UserError

METHODS = ("rtn", "gptq", "awq", "awq_gptq")
_GRID_METHODS = ("gptq", "awq", "awq_gptq")  # gguf only: they round float weights on its grid with calibration
_FORMATS = ("hf",)  # besides the registered exporters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """What to write and how float weights are rounded onto its grid.

    Args:
        format: hf (the Hugging Face folder), gguf (llama.cpp) or onnx (ONNX Runtime).
        type: weight type of the matrices (gguf: f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q3_k, q4_k, q5_k, q6_k,
            the mixes q4_k_m, q3_k_m, q2_k;
            onnx: f32, int8, int4). Default: the format's own (gguf f16, onnx f32).
        method: rtn | gptq | awq | awq_gptq (calibrated on the recipe's calibration data; gguf only).
        calib_samples, seq_len: calibration size.
        clip_search: gguf: shrink each block's range where that lowers its rounding error.
        importance: gguf: weight each block's rounding error by the calibration data's mean squared input
            per column (what llama.cpp's imatrix collects; ``gguf_imatrix``).
        embed_type: gguf: type of token_embd/output.
        tensor_types: gguf: ``GLOB=TYPE`` on GGUF tensor names, first match wins.
        group_size, lm_head, int8_compute: onnx options (see ``ONNXExportConfig``).
    """

    format: str = "hf"
    type: str | None = None
    method: str = "rtn"
    calib_samples: int = 128
    seq_len: int = 512
    clip_search: bool | None = None
    importance: bool | None = None
    embed_type: str | None = None
    tensor_types: tuple[str, ...] = ()
    group_size: int | None = None
    lm_head: bool | None = None
    int8_compute: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method not in METHODS:
            raise UserError(f"unknown export method {show(self.method)}; choose one of: {', '.join(METHODS)}")
        if self.calib_samples < 1 or self.seq_len < 2:
            raise UserError("calib_samples must be >= 1 and seq_len >= 2")
        if self.format == "hf":
            unset = {f.name: f.default for f in dataclasses.fields(self)}  # None / () / "rtn"
            extra = [f.name for f in dataclasses.fields(self) if f.name not in ("format", "calib_samples", "seq_len")
                     and getattr(self, f.name) not in (unset[f.name], False)]
            if extra:
                raise UserError(f"export format hf writes the model folder as it is; it takes no {', '.join(extra)}")
            return
        self.format_config()  # validates the format's own options (and the format name)
        if self.method in _GRID_METHODS and self.format != "gguf":
            raise UserError(f"method {self.method} rounds onto GGUF block types; for {self.format}, quantize the model "
                            "with lmslim quantize first and export it (its codes are written as they are)")
        if self.method in _GRID_METHODS and self.type in (None, "f16", "f32"):
            raise UserError(f"method {self.method} rounds onto a quantized type; give --type (e.g. q4_k_m)")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or bool(self.importance)

    def format_config(self, importance: Any = None) -> Any:
        """The chosen exporter's own options object, from the keys it takes (an error names the others).

        ``importance``: the per-column statistics ``importance: true`` asks for (computed by ``export_``).
        """
        from lmslim.modelio.export import exporter_names, get_exporter

        if self.format not in exporter_names():
            raise UserError(f"unknown export format {show(self.format)}; choose one of: "
                            f"{', '.join(_FORMATS + exporter_names())}")
        cls = get_exporter(self.format).config
        takes = {f.name for f in dataclasses.fields(cls)}
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("format", "method", "calib_samples", "seq_len")
                 and getattr(self, f.name) not in (None, (), False if f.name == "importance" else None)}
        unknown = sorted(set(given) - takes)
        if unknown:
            raise UserError(f"export format {self.format} does not take {', '.join(unknown)}")
        if "tensor_types" in given:
            given["tensor_types"] = tuple(_glob_type(item) for item in given["tensor_types"])
        if given.pop("importance", None):
            given["importance"] = importance  # the statistics, not the flag (None while only validating)
        return cls(**given)


def _glob_type(item: str) -> tuple[str, str]:
    pattern, sep, kind = str(item).rpartition("=")
    if not sep or not pattern or not kind:
        raise UserError(f"tensor_types takes GLOB=TYPE (e.g. 'blk.*.ffn_down.weight=q8_0'), got {item!r}")
    return pattern, kind


def export_(model, tokenizer, config: ExportConfig, path: Path, calib_ids=None) -> dict[str, Any]:
    """Write ``model`` as ``config.format`` to ``path`` (published atomically); the report of the write.

    ``calib_ids``: (n, seq_len) token ids, for the calibrated methods (see ``lmslim.data.calib``). They
    change ``model`` in place, which the caller loaded for this export: the input model on disk is only read.
    """
    from lmslim.modelio.export import export_model

    if config.format == "hf":
        raise UserError("export format hf is the saved model folder itself; there is no file to write")
    if config.needs_calibration and calib_ids is None:
        raise UserError(f"export with {'importance' if config.method == 'rtn' else 'method ' + config.method} needs "
                        "calibration data (--calib SPEC)")
    extra: dict[str, Any] = {}
    if config.method in ("awq", "awq_gptq"):  # first: importance and GPTQ then see the scaled weights
        extra["awq_scaled_groups"] = _awq_on_grid(model, config.format_config(), calib_ids)
    stats = None
    if config.importance:  # statistics of the float model, before GPTQ changes it
        from lmslim.modelio.export.gguf_imatrix import activation_importance

        stats = activation_importance(model, calib_ids)
    fmt_config = config.format_config(stats)
    calibrated = 0
    if config.method in ("gptq", "awq_gptq"):
        from lmslim.modelio.export.gguf_blocks import BLOCK_TYPES

        _refuse_quantized(model)
        if fmt_config.type in BLOCK_TYPES:
            calibrated = _gptq_on_grid(model, fmt_config, calib_ids)
        else:
            encoded, ratios = _gptq_on_type_grids(model, fmt_config, calib_ids)
            fmt_config = dataclasses.replace(fmt_config, encoded=encoded)
            calibrated = len(encoded)
            extra["gptq_error_vs_rtn_mean"] = sum(ratios) / max(len(ratios), 1)
    report = export_model(model, tokenizer, config.format, Path(path), fmt_config)
    return {**report, "format": config.format, "method": config.method, "gptq_matrices": calibrated, **extra}


def _refuse_quantized(model) -> None:
    from lmslim.nn.quant_linear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UserError("the model is already quantized; export it with method rtn (its codes are written as "
                        "they are when they sit on the type's grid)")


def _gptq_on_grid(model, config, calib_ids) -> int:
    """GPTQ in place on the matrices whose GGUF type is the base type, on that type's own grid."""
    from lmslim.compress.quantize import GPTQConfig, quantize_
    from lmslim.modelio.export.gguf import gguf_names
    from lmslim.modelio.export.gguf_blocks import grid_of
    from lmslim.nn.quant_linear import QuantLinear

    scheme = grid_of(config.type)
    others = tuple(n for n, g in gguf_names(model).items() if config.type_for(g) != config.type)
    gptq = GPTQConfig(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric, minmax=scheme.minmax,
                      signed_scale=scheme.signed_scale, clip_search=bool(config.clip_search), ignore=others)
    quantize_(model, gptq, calib_ids)
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def _quantized_targets(model, config) -> tuple[dict[str, str], dict[str, str]]:
    """(module name -> GGUF name, GGUF name -> written type) of the block matrices written quantized."""
    from lmslim.modelio.export.gguf import gguf_names, planned_types
    from lmslim.modelio.export.gguf_blocks import FLOAT_TYPES

    kinds = planned_types(model, config)
    names = {m: g for m, g in gguf_names(model).items() if kinds[g] not in FLOAT_TYPES}
    return names, kinds


def _gptq_on_type_grids(model, config, calib_ids, batch_size: int = 8) -> tuple[dict[str, Any], list[float]]:
    """GPTQ on each block matrix's fixed GGUF grid, sequentially through the blocks.

    Returns ({GGUF name: (type, raw blocks)}, per matrix GPTQ's output error / RTN's on the same grid).
    Each module's weight becomes the values its blocks hold, so later blocks calibrate on the quantized
    model's activations. Matrices outside the blocks (an untied LM head) are left to the writer's RTN.
    """
    from lmslim.compress.calibration import sequential
    from lmslim.compress.quantize.awq import collect_stats
    from lmslim.modelio.export.gguf_blocks import type_grid
    from lmslim.nn.quant_linear import linear_weight

    names, kinds = _quantized_targets(model, config)
    encoded: dict[str, Any] = {}
    ratios: list[float] = []

    def compress_block(_path, block, mods, inputs):
        stats = collect_stats(block, mods, inputs)  # H = XᵀX / N per matrix
        for name, mod in mods.items():
            g, w = names[name], linear_weight(mod).detach().float()
            grid = type_grid(w, kinds[g], (config.importance or {}).get(g), bool(config.clip_search))
            h = stats.hessian[name]
            codes = gptq_on_grid(w, h, grid)
            raw, values = grid.encode(codes)
            ratios.append(_output_error(w, grid.values(codes), h) / max(_output_error(w, grid.values(grid.codes), h),
                                                                         1e-30))
            mod.weight.data.copy_(torch.from_numpy(values))
            encoded[g] = (kinds[g], raw)

    for _ in sequential(model, calib_ids, set(names), batch_size, compress_block):
        pass
    log.info("GPTQ on %d GGUF grids: output error %.3f× RTN's on the same grids (mean)", len(encoded),
             sum(ratios) / max(len(ratios), 1))
    return encoded, ratios


def _output_error(w: torch.Tensor, values: torch.Tensor, h: torch.Tensor) -> float:
    """``||X Wᵀ − X Ŵᵀ||² / N = tr(Δ H Δᵀ)`` with ``H = XᵀX / N``."""
    delta = w - values  # (out, in)
    return float(((delta @ h) * delta).sum())


@torch.no_grad()
def gptq_on_grid(weight: torch.Tensor, hessian: torch.Tensor, grid, damp: float = 0.1, act_order: bool = True,
                 block_size: int = 128) -> torch.Tensor:
    """GPTQ's codes (out, in) for ``weight`` on a fixed grid (``gguf_blocks.TypeGrid``: ``w = step·q − off``).

    The GPTQ update of ``lmslim.compress.quantize.gptq`` (same damped inverse-Hessian factor, act-order,
    lazy block updates; https://arxiv.org/abs/2210.17323), except that no group parameters are fitted:
    every column is rounded on its given per-weight step and offset, so the codes land on exactly the grid
    the file stores. Defaults as ``GPTQConfig``'s.
    """
    from lmslim.compress.quantize.gptq import gptq_sweep, inverse_hessian_factor

    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out, k = w.shape
    dead = h.diagonal() == 0  # inputs that were always zero: any value works
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    step, off = grid.step[:, perm], grid.off[:, perm]
    safe = torch.where(step != 0, step, torch.ones_like(step))
    u = inverse_hessian_factor(h, damp)
    del h
    codes = torch.zeros(out, k, dtype=torch.int32)

    def round_column(c: int, rest: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round((rest[:, 0] + off[:, c]) / safe[:, c]), grid.qmin, grid.qmax)
        q = torch.where(step[:, c] != 0, q, torch.zeros_like(q))  # a zero step holds only its offset
        codes[:, c] = q.to(torch.int32)
        return step[:, c] * q - off[:, c]

    gptq_sweep(w, u, block_size, round_column)
    unperm = torch.empty_like(codes)
    unperm[:, perm] = codes
    return unperm


def _awq_on_grid(model, config, calib_ids, grid: int = 10, batch_size: int = 8) -> int:
    """Fold AWQ's input scales into ``model`` in place, each judged by rounding on the matrices' GGUF types.

    ``grid``: the ``α`` values tried (10, not AWQConfig's 20: each candidate runs the type's full RTN search,
    k-quant refits included, on every matrix of the group).

    Returns the number of scaled (producer -> consumers) groups.
    """
    from lmslim.compress.calibration import sequential
    from lmslim.compress.quantize.awq import awq_scale_block_, collect_stats
    from lmslim.nn.quant_linear import linear_weight

    _refuse_quantized(model)
    names, kinds = _quantized_targets(model, config)
    groups = 0

    def compress_block(path, block, mods, inputs):
        nonlocal groups
        by_shape: dict[tuple[int, ...], str] = {}
        for name, mod in mods.items():  # the coarser type where two of one shape differ (Q4_K_M's k / v)
            shape, kind = tuple(linear_weight(mod).shape), kinds[names[name]]
            by_shape[shape] = min(by_shape.get(shape, kind), kind, key=_bytes_per_weight)
        stats = collect_stats(block, mods, inputs)
        groups += len(awq_scale_block_(block, path, mods, stats, _TypeRounding(by_shape), grid))

    for _ in sequential(model, calib_ids, set(names), batch_size, compress_block):
        pass
    if not groups:
        log.warning("AWQ: no scalable (norm/linear -> linear) groups on quantized types; plain rounding")
    return groups


def _bytes_per_weight(kind: str) -> float:
    from lmslim.modelio.export.gguf_blocks import block_bytes

    return block_bytes(kind, 1, 256) / 256


class _TypeRounding:
    """AWQ's rounding of a candidate (``awq._rtn_dq``'s hook): the values of lmslim's RTN on the GGUF type
    the matrix is written as (looked up by shape)."""

    def __init__(self, kinds: dict[tuple[int, ...], str]):
        self.kinds = kinds

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        from lmslim.modelio.export.gguf_blocks import type_grid

        grid = type_grid(w, self.kinds[tuple(w.shape)])
        return grid.values(grid.codes)
