"""``lmslim export``: write a model as a file or folder another engine runs (GGUF for llama.cpp, ONNX).

Float weights going to a block type are rounded on that type's own grid with the chosen method
(RTN, or GPTQ calibrated on ``--calib``); a model lmslim already quantized on the type's grid is
written code for code. The file appears whole or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import ThreadsOpt, TrustOpt, app, check_out, out
from lmslim.core.errors import UserError


def _tensor_types(items: list[str]) -> tuple[tuple[str, str], ...]:
    parsed = []
    for item in items:
        pattern, sep, kind = item.rpartition("=")
        if not sep or not pattern or not kind:
            raise UserError(f"--tensor-type takes GLOB=TYPE (e.g. 'blk.*.ffn_down.weight=q8_0'), got {item!r}")
        parsed.append((pattern, kind))
    return tuple(parsed)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Model spec: folder, .gguf, builtin:<name> or hub id."),
    out_file: Path = typer.Option(..., "--out", help="Output file (e.g. model.gguf) or, for onnx, folder; must not "
                                  "exist unless --overwrite (files only)."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp) | onnx (ONNX Runtime; a folder)."),
    type_: Optional[str] = typer.Option(None, "--type", help="Weight type of the matrices: gguf f32, f16 (default), "
                                        "q8_0, q4_0, q4_1; onnx f32 (default), int8, int4."),
    group_size: int = typer.Option(128, "--group-size", help="onnx int8/int4: columns per scale for float weights."),
    lm_head: bool = typer.Option(False, "--lm-head", help="onnx int8/int4: quantize the LM head too."),
    embed_type: Optional[str] = typer.Option(None, "--embed-type", help="Type of token_embd/output (default: q8_0 "
                                             "under a 4-bit type, else --type)."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="GLOB=TYPE for GGUF tensor names, e.g. "
                                          "'blk.*.ffn_down.weight=q8_0' (repeatable; first match wins)."),
    method: str = typer.Option("rtn", "--method", help="How float weights are rounded onto a block type: rtn | gptq."),
    calib: str = typer.Option("builtin:wiki:train", "--calib", help="gptq: calibration text."),
    calib_samples: int = typer.Option(128, "--calib-samples"),
    seq_len: int = typer.Option(512, "--seq-len", help="gptq: tokens per calibration sample."),
    clip_search: bool = typer.Option(False, "--clip-search", help="Shrink each block's range where that lowers "
                                     "its rounding error."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
) -> None:
    """Export a model for a deployment engine (GGUF for llama.cpp), quantized on the engine's own grid."""
    import time

    from lmslim.core.runtime import Runtime
    from lmslim.modelio import load_model
    from lmslim.modelio.export import export_model, get_exporter
    from lmslim.modelio.export.gguf import GGUFExportConfig, gguf_names
    from lmslim.modelio.export.gguf_blocks import BLOCK_TYPES, grid_of

    exporter = get_exporter(fmt)
    if exporter.folder:
        return _export_folder(model, out_file, fmt, type_, group_size, lm_head, method, overwrite, threads,
                              trust_remote_code)
    type_ = type_ or "f16"
    config = GGUFExportConfig(type=type_, embed_type=embed_type, tensor_types=_tensor_types(tensor_type),
                              clip_search=clip_search)
    if method not in ("rtn", "gptq"):
        raise UserError(f"--method must be rtn or gptq, got {method!r}")
    if method == "gptq" and type_ not in BLOCK_TYPES:
        raise UserError(f"--method gptq rounds onto a block type ({', '.join(BLOCK_TYPES)}); {type_} is not one")
    if out_file.suffix != exporter.suffix:
        raise UserError(f"--out for {fmt} must end in {exporter.suffix}, got {out_file}")
    check_out(out_file, [model, calib if method == "gptq" else None], "--out")
    if (out_file.exists() or out_file.is_symlink()) and not overwrite:
        raise UserError(f"output {out_file} already exists; choose a new --out or pass --overwrite")
    rt = Runtime.create(device="cpu", threads=threads)
    lm = load_model(model, task="clm", dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    calibrated = None
    if method == "gptq":
        calibrated = _gptq_on_grid(lm, config, gguf_names(lm.model), grid_of(type_), calib, calib_samples, seq_len)
    report = export_model(lm.model, lm.tokenizer, fmt, out_file, config)
    types = ", ".join(f"{n} {k}" for k, n in report["types"].items())
    out.print(f"{fmt} {type_} ({method}{' + clip search' if clip_search else ''}): {report['tensors']} tensors "
              f"({types}); {report['bytes'] / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
              + (f"; GPTQ on {calibrated} matrices" if calibrated else ""))
    out.print(f"wrote {out_file}")


def _export_folder(model: str, out_dir: Path, fmt: str, type_: Optional[str], group_size: int, lm_head: bool,
                   method: str, overwrite: bool, threads: Optional[int], trust_remote_code: bool) -> None:
    """ONNX: a folder export; float matrices going to int8/int4 are rounded by RTN in the writer."""
    import time

    from lmslim.core.guard import check_output
    from lmslim.core.runtime import Runtime
    from lmslim.modelio import load_model
    from lmslim.modelio.export import export_model
    from lmslim.modelio.export.onnx import ONNXExportConfig

    config = ONNXExportConfig(type=type_ or "f32", group_size=group_size, lm_head=lm_head)
    if method != "rtn":
        raise UserError(f"--format {fmt} rounds float weights with rtn; for {method}, quantize the model first "
                        "(lmslim quantize) and export it: its codes are written as they are")
    if out_dir.exists() or out_dir.is_symlink():
        raise UserError(f"output {out_dir} already exists; choose a new --out (--overwrite replaces files, not an "
                        "export folder)")
    lock = check_output(out_dir, inputs=[model], folder=True, flag="--out")  # held while the folder is written
    rt = Runtime.create(device="cpu", threads=threads)
    lm = load_model(model, task="clm", dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    report = export_model(lm.model, lm.tokenizer, fmt, out_dir, config)
    out.print(f"{fmt} {config.type}: {report['nodes']} nodes, {report['matmul_nbits']} MatMulNBits matrices; "
              f"{report['bytes'] / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    out.print(f"wrote {out_dir}")
    del lock


def _gptq_on_grid(lm, config, names: dict[str, str], scheme, calib: str, samples: int, seq_len: int) -> int:
    """GPTQ in place on the matrices whose GGUF type is the base type, on that type's own grid."""
    from lmslim.compress.quantize import GPTQConfig, quantize_
    from lmslim.data.calib import calibration_ids
    from lmslim.data.spec import load_data
    from lmslim.nn.quant_linear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in lm.model.modules()):
        raise UserError("the model is already quantized; export it with --method rtn (its codes are written as "
                        "they are when they sit on the type's grid)")
    others = tuple(n for n, g in names.items() if config.type_for(g) != config.type)
    gptq = GPTQConfig(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric, minmax=scheme.minmax,
                      clip_search=config.clip_search, ignore=others)
    ids = calibration_ids(lm.tokenizer, load_data(calib, task="clm").documents, samples, seq_len)
    quantize_(lm.model, gptq, ids)
    return sum(isinstance(m, QuantLinear) for m in lm.model.modules())
