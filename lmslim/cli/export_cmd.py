"""``lmslim export``: write a model as a file or folder another engine runs (GGUF for llama.cpp, ONNX).

A one-stage recipe: the flags are the ``export`` stage's keys (``lmslim.compress.export.ExportConfig``),
parsed and run by the stage itself, as ``lmslim compress`` runs it, so a flag and a recipe key cannot
mean different things. Float weights going to a block type are rounded on that type's own grid with
the chosen method (RTN, or GPTQ / AWQ calibrated on ``--calib``); a model lmslim already quantized on the
type's grid is written code for code. The file (or ONNX folder) appears whole or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import ThreadsOpt, TrustOpt, app, check_out, out, stage_options
from lmslim.core.errors import UserError

# Flags that are not export-stage keys: the recipe's model and calibration data, the output, the runtime.
EXPORT_OUTSIDE_STAGE = {"model": "the recipe's model", "out_file": "the output file or folder",
                        "calib": "data.calibration", "overwrite": "output control", "threads": "runtime",
                        "trust_remote_code": "loading"}


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Model spec: folder, .gguf, builtin:<name> or hub id."),
    out_file: Path = typer.Option(..., "--out", help="Output file (e.g. model.gguf) or, for onnx, folder; must not "
                                  "exist unless --overwrite (files only)."),
    format: Optional[str] = typer.Option(None, "--format", help="gguf (llama.cpp) | onnx (ONNX Runtime; a folder). "
                                         "Default: gguf for an --out ending in .gguf."),
    type: Optional[str] = typer.Option(None, "--type", help="Weight type of the matrices: gguf f32, f16 (default), "
                                       "q8_0, q4_0, q4_1, q5_0, q5_1, q2_k…q6_k, mixes q4_k_m, q3_k_m, q2_k; onnx f32 (default), int8, int4."),
    method: Optional[str] = typer.Option(None, "--method", help="How float weights are rounded onto a block type: "
                                         "rtn (default) | gptq | awq | awq_gptq (gguf; calibrated on --calib)."),
    calib: str = typer.Option("builtin:wiki:train", "--calib", help="gptq / --importance: calibration text."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="gptq / --importance: samples "
                                                "(default 128)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="gptq / --importance: tokens per calibration "
                                          "sample (default 512)."),
    clip_search: Optional[bool] = typer.Option(None, "--clip-search/--no-clip-search", help="gguf: shrink each "
                                               "block's range where that lowers its rounding error."),
    importance: Optional[bool] = typer.Option(None, "--importance/--no-importance", help="gguf: weight each block's "
                                              "rounding error by --calib's mean squared input per column (as "
                                              "llama.cpp's imatrix)."),
    embed_type: Optional[str] = typer.Option(None, "--embed-type", help="gguf: type of token_embd/output (default: "
                                             "q8_0 under q4_0/q4_1/q5_0, q6_k under a k-quant, else --type)."),
    tensor_types: list[str] = typer.Option([], "--tensor-types", "--tensor-type", help="gguf: GLOB=TYPE for GGUF "
                                           "tensor names, e.g. 'blk.*.ffn_down.weight=q8_0' (repeatable; first "
                                           "match wins)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="onnx int8/int4: columns per scale for "
                                             "float weights (default 128)."),
    lm_head: Optional[bool] = typer.Option(None, "--lm-head/--no-lm-head", help="onnx int8/int4: quantize the LM "
                                           "head too."),
    int8_compute: Optional[bool] = typer.Option(None, "--int8-compute/--no-int8-compute", help="onnx: let ONNX "
                                                "Runtime multiply in int8 (default on)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
) -> None:
    """Export a model for a deployment engine (GGUF for llama.cpp, ONNX for ONNX Runtime) on the engine's own grid."""
    options = stage_options(locals(), EXPORT_OUTSIDE_STAGE)  # first: locals() are the flags only
    if "format" not in options:
        if out_file.suffix != ".gguf":
            raise UserError(f"--format is required for --out {out_file} (gguf or onnx)")
        options["format"] = "gguf"
    _export(model, out_file, options, calib, overwrite, threads, trust_remote_code)


def _export(model: str, out_file: Path, options: dict, calib: str, overwrite: bool, threads: Optional[int],
            trust_remote_code: bool) -> None:
    import time

    from lmslim.core.guard import check_output
    from lmslim.core.runtime import Runtime
    from lmslim.modelio import load_model
    from lmslim.modelio.export import get_exporter
    from lmslim.recipes.single import single_stage_recipe
    from lmslim.recipes.stages import STAGES, StageContext

    if options["format"] == "hf":
        raise UserError("--format hf is the model folder itself; save it with any technique command, or use gguf/onnx")
    recipe, stage = single_stage_recipe("export", options, model, data={"calibration": calib})
    exporter = get_exporter(stage.format)
    inputs = [model, calib if stage.needs_calibration else None]
    lock = None
    if exporter.folder:
        if out_file.exists() or out_file.is_symlink():
            raise UserError(f"output {out_file} already exists; choose a new --out (--overwrite replaces files, not "
                            "an export folder)")
        lock = check_output(out_file, inputs=inputs, folder=True, flag="--out")  # held while the folder is written
    else:
        if out_file.suffix != exporter.suffix:
            raise UserError(f"--out for {stage.format} must end in {exporter.suffix}, got {out_file}")
        check_out(out_file, inputs, "--out")
        if (out_file.exists() or out_file.is_symlink()) and not overwrite:
            raise UserError(f"output {out_file} already exists; choose a new --out or pass --overwrite")
    rt = Runtime.create(device="cpu", threads=threads)
    lm = load_model(model, task="clm", dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    ctx = StageContext(recipe=recipe, runtime=rt, work_dir=out_file.parent, input_spec=model, artifact_path=out_file)
    _, _, report = STAGES["export"].run(lm, stage, ctx)
    types = ", ".join(f"{n} {k}" for k, n in (report.get("types") or {}).items())
    out.print(f"{stage.format} {stage.format_config().type} ({stage.method}): "
              + (f"{report['tensors']} tensors ({types}); " if "tensors" in report else "")
              + f"{report['bytes'] / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
              + (f"; AWQ scales on {report['awq_scaled_groups']} groups" if report.get("awq_scaled_groups") else "")
              + (f"; GPTQ on {report['gptq_matrices']} matrices" if report.get("gptq_matrices") else "")
              + (f" (layer output error {report['gptq_error_vs_rtn_mean']:.3f}× RTN's on the same grids)"
                 if "gptq_error_vs_rtn_mean" in report else ""))
    out.print(f"wrote {out_file}")
    del lock
