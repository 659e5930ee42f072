"""``lmslim prune``: one pruning method on a model (a one-stage recipe), saved atomically with a JSON report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import (STREAM_OUTSIDE, MaxActivationOpt, StreamOpt, ThreadsOpt, TrustOpt, app, out,
                               run_stage_command, stage_options)

# Flags of `lmslim prune` that are not prune-stage keys, and where a recipe says the same thing.
PRUNE_OUTSIDE_STAGE = {"model": "model", "calib": "data.calibration", "out_dir": "compress --out",
                       "dense": "(saving: zeros stored densely)", "overwrite": "compress --overwrite",
                       "threads": "compress --threads", "trust_remote_code": "(not in recipes: off)",
                       **STREAM_OUTSIDE}


@app.command()
def prune(
    model: str = typer.Argument(..., help="Model spec (full precision)."),
    method: str = typer.Option(..., "--method", help="magnitude | wanda | sparsegpt | heads | neurons | layers | width"),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="magnitude/wanda/sparsegpt: fraction of "
                                             "weights set to zero, in [0, 1) (default 0.5)."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="heads/neurons/layers/width: share of units "
                                             "removed, in [0, 1) (defaults: heads 0.25, neurons 0.5, width 0.25)."),
    n_m: Optional[str] = typer.Option(None, "--n-m", help="N:M pattern for magnitude/wanda/sparsegpt, e.g. 2:4."),
    drop: Optional[int] = typer.Option(None, "--drop", "--drop-layers", help="layers: number of layers to remove."),
    drop_heads: Optional[int] = typer.Option(None, "--drop-heads", help="heads: query heads removed per layer."),
    scope: Optional[str] = typer.Option(None, "--scope", help="layer (default): same fraction in every "
                                        "matrix/block (uniform shapes); global: ranked across the model."),
    overrides: list[str] = typer.Option([], "--overrides", "--layer-sparsity", help="PATTERN=FRACTION per-matrix "
                                        "sparsity (repeatable; first match wins)."),
    calib: str = typer.Option("builtin:wiki:train", "--calib", help="Calibration text (all but magnitude)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration samples (default 128)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per calibration sample (default 512)."),
    damp: Optional[float] = typer.Option(None, "--damp", help="sparsegpt: Hessian dampening (fraction of mean "
                                         "diagonal, default 0.01)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="sparsegpt: columns per block (default 128)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Calibration samples per forward pass "
                                             "(default 8)."),
    targets: list[str] = typer.Option([], "--targets", "--target", help="Module-name glob to prune (repeatable; "
                                      "re: regex; default every linear)."),
    ignore: list[str] = typer.Option([], "--ignore", help="Module-name glob to leave dense (repeatable)."),
    include_lm_head: Optional[bool] = typer.Option(None, "--include-lm-head/--no-include-lm-head",
                                                   help="Prune the LM head too (default off)."),
    dense: bool = typer.Option(False, "--dense", help="Save zeros densely even where the model's format could "
                               "store them compressed."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
    stream: bool = StreamOpt, max_activation_mb: Optional[float] = MaxActivationOpt,
) -> None:
    """Prune a model and save it: zeros in the weights, or physically smaller matrices.

    Each flag is the prune recipe stage's key of the same name (docs/recipes.md): the command runs a
    one-stage recipe, exactly as `lmslim compress` runs that stage.
    """
    options = stage_options(locals(), PRUNE_OUTSIDE_STAGE)  # first: locals() are the flags only
    report = run_stage_command("prune", options, model, out_dir, data={"calibration": calib}, overwrite=overwrite,
                               threads=threads, trust_remote_code=trust_remote_code, dense=dense, stream=stream,
                               max_activation_mb=max_activation_mb)
    what = (f"{report['sparsity']:.1%} of targeted weights zero" if "sparsity" in report else
            f"{report['params_before']:,} -> {report['params_after']:,} parameters")
    out.print(f"{method}: {what} in {report['seconds']:.1f} s; {report['size_mb_before']:.1f} MB -> "
              f"{report['size_mb_after']:.1f} MB on disk ({report['storage']}); "
              f"peak RSS {report['peak_rss_mb']:.0f} MB")
    if "sparsity" in report:
        smaller = "make the file smaller but" if report["storage"] != "dense" else "are stored densely and"
        out.print(f"note: zeros inside dense matrices {smaller} do not make the model faster on dense kernels "
                  "(lmslim bench states this); structured methods (heads, neurons, layers) shrink the matrices")
    out.print(f"wrote {out_dir}")
