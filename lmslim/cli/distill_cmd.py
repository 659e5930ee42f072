"""``lmslim distill`` (teacher → student) and ``lmslim share`` (ALBERT cross-layer sharing)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import ThreadsOpt, TrustOpt, app, out
from lmslim.core.errors import UserError


def _check_out_dir(out_dir: Path, overwrite: bool, resume: bool = False) -> None:
    from lmslim.core.io import check_writable_target

    if out_dir.exists() and not (overwrite or resume):
        raise UserError(f"output {out_dir} already exists; choose a new --out or pass --overwrite")
    check_writable_target(out_dir / "config.json")


@app.command()
def share(
    model: str = typer.Argument(..., help="Model spec (full precision, not already shared)."),
    group_size: int = typer.Option(..., "--group-size", help="Consecutive layers that share one set of weights (>= 2)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    init: str = typer.Option("mean", "--init", help="mean | first | index: initial shared weights of each group."),
    index: int = typer.Option(0, "--index", help="With --init index: which layer of each group (0-based)."),
    keep_norms: bool = typer.Option(True, "--keep-norms/--share-norms", help="Keep per-layer norm weights."),
    task: str = typer.Option("auto", "--task", help="auto (from the architecture), clm or embed."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
) -> None:
    """Share block weights across groups of consecutive layers (ALBERT); fewer parameters, same FLOPs.

    Quality drops until the shared model is re-trained: recover it with
    ``lmslim distill --teacher MODEL --student OUT ...``.
    """
    from lmslim.compress.share import ShareConfig, save_shared, share_
    from lmslim.core.io import atomic_dir
    from lmslim.core.models import load_model, resolve
    from lmslim.core.runtime import Runtime

    config = ShareConfig(group_size=group_size, init=init, index=index, keep_norms=keep_norms)
    if task not in ("auto", "clm", "embed"):
        raise UserError(f"share --task must be auto, clm or embed, got {task!r}")
    _check_out_dir(out_dir, overwrite)
    rt = Runtime.create(device="cpu", threads=threads)
    if task == "auto":
        from lmslim.cli.main import _causal_or_embed

        task = _causal_or_embed(resolve(model))
    lm = load_model(model, task=task, dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    size_before = lm.resolved.size_bytes()
    t0 = time.perf_counter()
    report = share_(lm.model, config)
    with atomic_dir(out_dir) as tmp:
        save_shared(lm.model, lm.tokenizer, tmp)
        size_after = (tmp / "model.safetensors").stat().st_size
        report.update({"model": model, "weights_sha256": lm.resolved.weights_hash(), "config": config.__dict__,
                       "size_mb_before": size_before / 1e6, "size_mb_after": size_after / 1e6,
                       "seconds": time.perf_counter() - t0})
        (tmp / "lmslim_share.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.print(f"share: {len(report['groups'])} groups of <= {group_size} layers; parameters "
              f"{report['params_before'] / 1e6:.2f} M -> {report['params_after'] / 1e6:.2f} M (unique); "
              f"{size_before / 1e6:.1f} MB -> {size_after / 1e6:.1f} MB on disk. FLOPs per token are unchanged "
              "(every layer still runs); quality needs recovery (lmslim distill).", soft_wrap=True)
    out.print(f"wrote {out_dir}")
