"""Export as a technique: a model written as the file another engine runs, rounded on that engine's grid.

One config and one function serve ``lmslim export`` and the recipe stage ``export`` alike, so a flag
and a recipe key cannot mean different things. ``format: hf`` is the saved Hugging Face folder every
stage already writes; ``gguf`` (llama.cpp) and ``onnx`` (ONNX Runtime) go through the exporters of
``lmslim.modelio.export``, each with its own options dataclass: ``ExportConfig`` carries the union
of their keys, and a key the chosen format does not take is an error, not silently ignored.

``method: gptq`` calibrates float weights onto the format's own grid before writing (GGUF block
types: ``gguf_blocks.grid_of``), so the file carries GPTQ's rounding decisions exactly.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmslim.core.configs import check_fields, show
from lmslim.core.errors import UserError

METHODS = ("rtn", "gptq")
_FORMATS = ("hf",)  # besides the registered exporters


@dataclass(frozen=True)
class ExportConfig:
    """What to write and how float weights are rounded onto its grid.

    Args:
        format: hf (the Hugging Face folder), gguf (llama.cpp) or onnx (ONNX Runtime).
        type: weight type of the matrices (gguf: f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q3_k, q4_k, q5_k, q6_k,
            the mixes q4_k_m, q3_k_m, q2_k;
            onnx: f32, int8, int4). Default: the format's own (gguf f16, onnx f32).
        method: rtn | gptq (gptq calibrates on the recipe's calibration data; gguf block types only).
        calib_samples, seq_len: gptq calibration size.
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
        if self.method == "gptq" and self.format != "gguf":
            raise UserError(f"method gptq rounds onto GGUF block types; for {self.format}, quantize the model with "
                            "lmslim quantize first and export it (its codes are written as they are)")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or bool(self.importance)

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

    ``calib_ids``: (n, seq_len) token ids, for ``method: gptq`` (see ``lmslim.data.calib``). GPTQ runs
    on ``model`` in place, which the caller loaded for this export: the input model on disk is only read.
    """
    from lmslim.modelio.export import export_model

    if config.format == "hf":
        raise UserError("export format hf is the saved model folder itself; there is no file to write")
    if config.needs_calibration and calib_ids is None:
        raise UserError(f"export with {'method gptq' if config.method == 'gptq' else 'importance'} needs calibration "
                        "data (--calib SPEC)")
    stats = None
    if config.importance:  # statistics of the float model, before GPTQ changes it
        from lmslim.modelio.export.gguf_imatrix import activation_importance

        stats = activation_importance(model, calib_ids)
    fmt_config = config.format_config(stats)
    calibrated = _gptq_on_grid(model, fmt_config, calib_ids) if config.method == "gptq" else 0
    report = export_model(model, tokenizer, config.format, Path(path), fmt_config)
    return {**report, "format": config.format, "method": config.method, "gptq_matrices": calibrated}


def _gptq_on_grid(model, config, calib_ids) -> int:
    """GPTQ in place on the matrices whose GGUF type is the base type, on that type's own grid."""
    from lmslim.compress.quantize import GPTQConfig, quantize_
    from lmslim.modelio.export.gguf import gguf_names
    from lmslim.modelio.export.gguf_blocks import BLOCK_TYPES, grid_of
    from lmslim.nn.quant_linear import QuantLinear

    if config.type not in BLOCK_TYPES:
        raise UserError(f"method gptq rounds onto a block type ({', '.join(BLOCK_TYPES)}); {config.type} is not one")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UserError("the model is already quantized; export it with method rtn (its codes are written as "
                        "they are when they sit on the type's grid)")
    scheme = grid_of(config.type)
    others = tuple(n for n, g in gguf_names(model).items() if config.type_for(g) != config.type)
    gptq = GPTQConfig(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric, minmax=scheme.minmax,
                      signed_scale=scheme.signed_scale, clip_search=bool(config.clip_search), ignore=others)
    quantize_(model, gptq, calib_ids)
    return sum(isinstance(m, QuantLinear) for m in model.modules())
