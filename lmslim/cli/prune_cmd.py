"""``lmslim prune``: one pruning method on a model, saved atomically with a JSON report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import ThreadsOpt, TrustOpt, app, guard_out, out
from lmslim.core.errors import UserError

_UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
_STRUCTURED = ("heads", "neurons", "layers", "width")


def _overrides(items: list[str]) -> tuple[tuple[str, float], ...]:
    parsed = []
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            parsed.append((pattern, float(value)))
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise UserError(f"--layer-sparsity takes PATTERN=FRACTION (e.g. '*.down_proj=0.3'), got {item!r}")
    return tuple(parsed)


def build_config(method: str, sparsity: Optional[float], n_m: Optional[str], drop_layers: Optional[int],
                 drop_heads: Optional[int], scope: str, target: list[str], ignore: list[str],
                 layer_sparsity: list[str], include_lm_head: bool, damp: float):
    """The method's config object from CLI options (UserError for combinations that do not apply)."""
    from lmslim.compress.prune import PRUNERS

    cls = PRUNERS.config_class(method)
    if scope != "layer" and method in ("wanda", "sparsegpt", "layers"):
        raise UserError(f"--scope global applies to magnitude, heads and neurons, not {method}")
    if method in _UNSTRUCTURED:
        if drop_layers is not None or drop_heads is not None:
            raise UserError(f"--drop-layers/--drop-heads do not apply to {method}; use --sparsity or --n-m")
        if n_m is not None and sparsity is not None:
            raise UserError("give either --sparsity or --n-m, not both (N:M fixes the sparsity at 1 - N/M)")
        kwargs = dict(sparsity=0.5 if sparsity is None else sparsity, n_m=n_m, targets=tuple(target),
                      ignore=tuple(ignore), overrides=_overrides(layer_sparsity), include_lm_head=include_lm_head)
        if method == "magnitude":
            kwargs["scope"] = scope
        if method == "sparsegpt":
            kwargs["damp"] = damp
        return cls(**kwargs)
    if n_m is not None or layer_sparsity or include_lm_head or target != ["*"] or ignore:
        raise UserError(f"{method} removes whole units: --n-m, --layer-sparsity, --target, --ignore and "
                        "--include-lm-head do not apply")
    if method == "layers":
        if drop_heads is not None:
            raise UserError("--drop-heads does not apply to layers")
        if drop_layers is not None and sparsity is not None:
            raise UserError("give either --drop-layers or --sparsity, not both")
        return cls(drop=drop_layers, fraction=sparsity)
    if drop_layers is not None:
        raise UserError(f"--drop-layers does not apply to {method}; use --sparsity")
    if method == "heads":
        return cls(fraction=0.25 if sparsity is None else sparsity, drop_heads=drop_heads,
                   scope="layer" if drop_heads is not None else scope)
    if drop_heads is not None:
        raise UserError("--drop-heads applies to --method heads only")
    if method == "width":
        if scope != "layer":
            raise UserError("--scope global does not apply to width (one hidden size for the whole model)")
        return cls(fraction=0.25 if sparsity is None else sparsity)
    return cls(fraction=0.5 if sparsity is None else sparsity, scope=scope)


@app.command()
def prune(
    model: str = typer.Argument(..., help="Model spec (full precision)."),
    method: str = typer.Option(..., "--method", help="magnitude | wanda | sparsegpt | heads | neurons | layers | width"),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction removed, in [0, 1): weights "
                                             "(default 0.5), heads (0.25), neurons (0.5), layers or hidden channels (width, 0.25)."),
    n_m: Optional[str] = typer.Option(None, "--n-m", help="N:M pattern for magnitude/wanda/sparsegpt, e.g. 2:4."),
    drop_layers: Optional[int] = typer.Option(None, "--drop-layers", help="layers: number of layers to remove."),
    drop_heads: Optional[int] = typer.Option(None, "--drop-heads", help="heads: query heads removed per layer."),
    scope: str = typer.Option("layer", "--scope", help="layer: same fraction in every matrix/block (uniform "
                              "shapes); global: ranked across the model."),
    layer_sparsity: list[str] = typer.Option([], "--layer-sparsity", help="PATTERN=FRACTION per-matrix override "
                                              "(repeatable; first match wins)."),
    calib: str = typer.Option("builtin:wiki:train", "--calib", help="Calibration text (all but magnitude)."),
    calib_samples: int = typer.Option(128, "--calib-samples"),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sample."),
    damp: float = typer.Option(0.01, "--damp", help="sparsegpt: Hessian dampening (fraction of mean diagonal)."),
    target: list[str] = typer.Option(["*"], "--target", help="Module-name glob to prune (repeatable; re: regex)."),
    ignore: list[str] = typer.Option([], "--ignore", help="Module-name glob to leave dense (repeatable)."),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="Prune the LM head too."),
    dense: bool = typer.Option(False, "--dense", help="Save zeros densely (a plain folder any tool loads) "
                               "instead of bitmask + values."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
) -> None:
    """Prune a model and save it: zeros (bitmask-compressed on disk) or physically smaller matrices."""
    import json as _json
    import time

    from lmslim.compress.prune import prune_
    from lmslim.modelio.formats.lmslim_sparse import save_pruned
    from lmslim.core.io import atomic_dir
    from lmslim.modelio import load_model
    from lmslim.core.runtime import Runtime
    from lmslim.measure.bench import peak_rss_mb

    config = build_config(method, sparsity, n_m, drop_layers, drop_heads, scope, target, ignore, layer_sparsity,
                          include_lm_head, damp)
    guard_out(out_dir, inputs=[model, calib], overwrite=overwrite)
    rt = Runtime.create(device="cpu", threads=threads)
    lm = load_model(model, task="clm", dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    calib_ids = None
    if getattr(config, "needs_calibration", False):
        from lmslim.data.calib import calibration_ids
        from lmslim.data.spec import load_data

        calib_ids = calibration_ids(lm.tokenizer, load_data(calib, task="clm").documents, calib_samples, seq_len)
    size_before = lm.resolved.size_bytes()
    t0 = time.perf_counter()
    report = prune_(lm.model, config, calib_ids)
    with atomic_dir(out_dir) as tmp:
        saved = save_pruned(lm.model, lm.tokenizer, tmp, compress=not dense)
        report.update({"model": model, "weights_sha256": lm.resolved.weights_hash(),
                       "calib": calib if calib_ids is not None else None, "size_mb_before": size_before / 1e6,
                       "size_mb_after": saved["bytes"] / 1e6, "compressed_tensors": saved["compressed_tensors"],
                       "storage": "dense" if dense or not saved["compressed_tensors"] else "bitmask+values",
                       "peak_rss_mb": peak_rss_mb(), "wall_seconds": time.perf_counter() - t0})
        (tmp / "lmslim_prune.json").write_text(_json.dumps(report, indent=2, default=str) + "\n")
    what = (f"{report['sparsity']:.1%} of targeted weights zero" if "sparsity" in report else
            f"{report['params_before']:,} -> {report['params_after']:,} parameters")
    out.print(f"{method}: {what} in {report['seconds']:.1f} s; {size_before / 1e6:.1f} MB -> "
              f"{saved['bytes'] / 1e6:.1f} MB on disk ({report['storage']}); peak RSS {report['peak_rss_mb']:.0f} MB")
    if "sparsity" in report:
        out.print("note: zeros inside dense matrices make the file smaller, not the model faster on dense kernels "
                  "(lmslim bench states this); structured methods (heads, neurons, layers) shrink the matrices")
    out.print(f"wrote {out_dir}")
