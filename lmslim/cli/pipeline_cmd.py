"""``lmslim compress``, ``lmslim report`` and ``lmslim demo``: the pipeline surface."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import MaxActivationOpt, ThreadsOpt, app, guard_out, out
from lmslim.core.errors import UserError


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="Model spec (default: the recipe's model)."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe YAML (see recipes/ and docs/recipes.md)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    overrides: list[str] = typer.Argument(None, help="key=value recipe overrides, e.g. eval.max_tokens=4096",
                                          show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quick: bool = typer.Option(False, "--quick", help="Apply the recipe's quick: overrides (smaller budgets)."),
    measure_cache: Optional[Path] = typer.Option(None, "--measure-cache",
                                                 help="Reuse eval/bench results of identical weights from here."),
    stage_cache: Optional[Path] = typer.Option(None, "--stage-cache",
                                               help="Reuse finished stages of identical inputs and options from "
                                                    "here (shared across runs; files hard-linked)."),
    stream: bool = typer.Option(False, "--stream", help="Never load the whole model: every stage (quantize "
                                "gptq/rtn/awq/smoothquant/dynamic-int8, prune sparsegpt/wanda) and the perplexity run one "
                                "block at a time; "
                                "no benchmark. Same weights as without it."),
    max_activation_mb: Optional[float] = MaxActivationOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Run a recipe's stages, measuring quality and cost before and after each; resumable."""
    from lmslim.recipes.run import compress as run_compress
    from lmslim.recipes.schema import load_recipe_file

    # Typer cannot mix an optional positional with trailing key=value items; sort them out here.
    items = list(overrides or [])
    if model is not None and "=" in model and not Path(model).exists():
        items.insert(0, model)
        model = None
    r, raw = load_recipe_file(recipe, items, quick=quick)
    spec = model or r.model
    if spec is None:
        raise UserError("no model: give MODEL or set model: in the recipe")
    # run_compress checks --out and --measure-cache and holds the output's lock (for Python callers too).
    results = run_compress(spec, r, raw, out_dir, overwrite=overwrite, threads=threads, measure_cache=measure_cache,
                           stage_cache=stage_cache, sources=(recipe,), stream=stream,
                           max_activation_mb=max_activation_mb)
    _print_variants(results)
    if "stream" in results:
        out.print(f"--stream: bench {results['stream']['bench']}")
    out.print(f"wrote {out_dir} (final model in {out_dir / 'model'})")


def _print_variants(results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"compress: {results['recipe']}")
    for col in ("variant", "quality", "decode tok/s", "size MB"):
        table.add_column(col)
    for v in results["variants"]:
        ev, be = v.get("eval") or {}, v.get("bench") or {}
        q = next((f"{k} {ev[k]:.4g}" for k in ("perplexity", "accuracy", "macro_f1", "spearman") if k in ev), "–")
        table.add_row(v["name"], q, f"{be['decode_tokens_per_s']:.1f}" if be.get("decode_tokens_per_s") else "–",
                      f"{be['size_mb']:.1f}" if be.get("size_mb") else "–")
    out.print(table)


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="compress output folders; the first one's baseline is the reference."),
           out_dir: Path = typer.Option(..., "--out", help="Report folder (report.md, report.html, pareto.png)."),
           background: list[Path] = typer.Option([], "--background", help="More runs drawn as grey points only "
                                                  "(e.g. a search's trials: not in the table or the front)."),
           overwrite: bool = typer.Option(False, "--overwrite")) -> None:
    """Quality-vs-cost report with a Pareto chart and a per-variant speed verdict."""
    from lmslim.report.build import build_report

    guard_out(out_dir, inputs=[*runs, *background], overwrite=overwrite)
    res = build_report(runs, out_dir, background_dirs=background)
    front = [r["name"] for r in res["rows"] if r["pareto"]]
    out.print(f"{len(res['rows'])} variants; Pareto front: {', '.join(front) or '–'}")
    out.print(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.html'}, {out_dir / 'pareto.png'}")


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="Smaller calibration/training/eval budgets (≤ 15 min here)."),
         out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where runs and the report go."),
         model: str = typer.Option("builtin:smollm2-135m", "--model", help="Model spec to compress."),
         threads: Optional[int] = ThreadsOpt) -> None:
    """The embedded demo: SmolLM2-135M on builtin:wiki through every shipped demo recipe, then a report."""
    from lmslim.recipes.demo import run_demo

    report_dir = run_demo(model, out_dir, quick=quick, threads=threads, log=out.print)
    out.print(f"report: {report_dir / 'report.html'} (markdown: {report_dir / 'report.md'})")
