"""The embedded demo: every recipe in ``recipes/demo/`` on one model, then one report.

Each recipe runs as ``lmslim compress`` would (resumable, measured before/after each stage); all
runs share one measurement cache, so the baseline is measured once and every variant is measured
with the same settings in the same session.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from lmslim.core.errors import UserError


def recipes_dir() -> Path:
    """The shipped ``recipes/`` folder (next to the package in a source checkout)."""
    d = Path(__file__).resolve().parents[2] / "recipes"
    if not d.is_dir():
        raise UserError(f"shipped recipes not found at {d}; run from a source checkout of lmslim")
    return d


def demo_recipes() -> list[Path]:
    return sorted((recipes_dir() / "demo").glob("*.yaml"))


def run_demo(model: str, out: Path, *, quick: bool, threads: int | None, log: Callable[[str], None] = print) -> Path:
    """Run every demo recipe into ``out/runs/<name>`` and the report into ``out/report``."""
    from lmslim.recipes.run import compress
    from lmslim.recipes.schema import load_recipe_file
    from lmslim.report.build import build_report

    out = Path(out)
    recipes = demo_recipes()
    if not recipes:
        raise UserError(f"no demo recipes in {recipes_dir() / 'demo'}")
    # Validate them all before spending any time.
    loaded = [(p, *load_recipe_file(p, quick=quick)) for p in recipes]
    mode = "quick" if quick else "full"
    run_dirs = []
    t0 = time.perf_counter()
    for path, recipe, raw in loaded:
        run_dir = out / mode / "runs" / path.stem
        run_dirs.append(run_dir)
        if (run_dir / "results.json").is_file():
            log(f"{path.stem}: already done in {run_dir}")
            continue
        log(f"{path.stem}: running ({len(recipe.stages)} stage(s)); {time.perf_counter() - t0:.0f} s so far")
        compress(model, recipe, raw, run_dir, threads=threads, measure_cache=out / mode / "measure-cache")
    report_dir = out / mode / "report"
    build_report(run_dirs, report_dir)
    log(f"demo ({mode}) finished in {time.perf_counter() - t0:.0f} s")
    return report_dir
