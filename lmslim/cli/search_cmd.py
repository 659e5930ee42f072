"""``lmslim search``: the fastest model within a quality budget, searched across techniques and measured
in the engine it will run in (``lmslim.search``). The flags are ``SearchConfig``'s fields."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import ThreadsOpt, app, out
from lmslim.core.errors import UserError


def _duration(text: Optional[str]) -> Optional[float]:
    """``90``, ``90s``, ``45m``, ``2h`` → seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UserError(f"--time takes a duration like 90s, 45m or 2h, got {text!r}") from None


@app.command("search")
def search_cmd(
    model: str = typer.Argument(..., help="Model spec: folder, .gguf, builtin:<name> or hub id."),
    data: str = typer.Option(..., "--data", help="Evaluation text (perplexity), e.g. builtin:wiki:test."),
    budget: str = typer.Option(..., "--budget", help='Quality (and cost) limits, e.g. "ppl<=+5%" or '
                               '"ppl<=+3%,size_mb<=80"; relative limits are to the input model.'),
    out_dir: Path = typer.Option(..., "--out", help="Search folder (study.db, trials, front, best.yaml, report); "
                                 "an existing search folder is resumed or joined."),
    objective: str = typer.Option("decode_tok_s", "--objective", help="decode_tok_s | prefill_tok_s | prefill_ms | "
                                  "size_mb | peak_rss_mb."),
    engine: str = typer.Option("llama.cpp", "--engine", help="Where variants run and are measured: llama.cpp | "
                               "onnxruntime | torch."),
    trials: int = typer.Option(20, "--trials", help="Finished trials the study should hold (all workers)."),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Wall-clock limit of this run (90s, 45m, 2h); "
                                             "no trial starts after it."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text (default: --data)."),
    train: Optional[str] = typer.Option(None, "--train", help="Distillation text (default: --calib)."),
    space: Optional[Path] = typer.Option(None, "--space", help="YAML file replacing dimensions' choices "
                                         "(see lmslim.search.space)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by workers "
                                          "(default: sqlite in --out; postgresql://… across machines)."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe | nsga2."),
    seed: int = typer.Option(0, "--seed"),
    proxy_tokens: int = typer.Option(4096, "--proxy-tokens", help="Perplexity tokens per trial."),
    full_tokens: int = typer.Option(16384, "--full-tokens", help="Perplexity tokens for the re-measured front."),
    front_max: int = typer.Option(6, "--front-max", help="Front variants re-measured in full."),
    rounds: int = typer.Option(2, "--rounds", help="Interleaved bench rounds for the front."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Bench prefill tokens."),
    gen_len: int = typer.Option(32, "--gen-len", help="Bench decode steps."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Search stage combinations for the best objective within the budget, measured in --engine."""
    from lmslim.search.study import SearchConfig, run_search

    config = SearchConfig(model=model, data=data, budget=budget, calib=calib, train=train, objective=objective,
                          engine=engine, trials=trials, time_s=_duration(time_limit), storage=storage,
                          sampler=sampler, seed=seed, space=str(space) if space else None,
                          proxy_tokens=proxy_tokens, full_tokens=full_tokens, front_max=front_max, rounds=rounds,
                          prompt_len=prompt_len, gen_len=gen_len, threads=threads)

    def say(line: str) -> None:  # one line per event, on a terminal and in logs alike
        print(line, file=sys.stderr, flush=True)

    import warnings

    # Optuna marks group-wise TPE and heartbeats experimental; they are what this command relies on.
    warnings.filterwarnings("ignore", message=r".*(experimental|heartbeat).*")
    summary = run_search(config, out_dir, say)
    if not summary.get("finished", True):
        return
    best = summary["best"]
    out.print(f"{summary['trials']['complete']} trials complete ({summary['trials']['stage_cache_hits']} stage "
              f"cache hits); front of {len(summary['front'])} re-measured")
    if best:
        out.print(f"best within {budget}: trial {best['trial']} ({best['describe']}): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in best["full"].items() if v is not None))
        out.print(f"wrote {out_dir / 'best.yaml'} (lmslim compress --recipe {out_dir / 'best.yaml'} reproduces it) "
                  f"and {out_dir / 'report' / 'report.html'}")
    else:
        out.print(f"no re-measured variant is within {budget}; see {out_dir / 'search.json'}")
