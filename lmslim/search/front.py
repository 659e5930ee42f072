"""The end of a search: the Pareto front re-measured in full, the best recipe within budget, the report.

Trials are compared on the proxy (short perplexity windows, few bench repeats); what the search
reports is not. The front's variants and the input model are measured again with the full windows,
and their decode speed in ``rounds`` interleaved rounds (each round visits every variant, in a
rotated order, so drift on a shared machine hits all of them alike; the median of rounds is kept).
The budget is then checked on these numbers, and the fastest variant within it is written as
``best.yaml``: a recipe ``lmslim compress`` reproduces.

Output (``DIR``): ``front/NN-HASH/results.json`` (a compress result: baseline and the variant, full
measurement), ``best.yaml``, ``search.json`` (trials, time, cache hits, front, best) and ``report/``
(the report's chart: trials in grey, the re-measured front highlighted).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from lmslim.core.io import atomic_dir, atomic_write_json, atomic_write_text

FULL_BENCH = {"repeats": 5, "warmup": 2}  # per round, for the re-measured front


def _key(plan, values: tuple[float, float]) -> tuple[float, float]:
    """Both values as "lower is better"."""
    q, o = values
    return (-q if plan.quality[1] else q), (-o if plan.objective.maximize else o)


def pareto(plan, trials: list) -> list:
    """Trials no other trial beats on both quality and objective (ties kept once, by trial number)."""
    pts = [(t, _key(plan, tuple(t.values))) for t in trials]
    front = []
    for t, (a, b) in pts:
        beaten = any((c <= a and d <= b) and ((c < a or d < b) or u.number < t.number) for u, (c, d) in pts if u is not t)
        if not beaten:
            front.append(t)
    return sorted(front, key=lambda t: _key(plan, tuple(t.values))[1])


def spread(plan, front: list, k: int) -> list:
    """At most ``k`` front points: the best objective always, the rest evenly along the front."""
    front = sorted(front, key=lambda t: _key(plan, tuple(t.values))[1])
    if len(front) <= k:
        return front
    picks = {round(i * (len(front) - 1) / (k - 1)) for i in range(k)} if k > 1 else {0}
    return [t for i, t in enumerate(front) if i in picks]


def feasible(trial) -> bool:
    return all(v <= 0 for v in trial.user_attrs.get("constraints", [0.0]))


def _complete(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def describe(trial) -> str:
    parts = []
    for s in trial.user_attrs.get("stages", []):
        (name, o), = s.items()
        if name == "prune":
            parts.append(f"{o['method']} {o.get('fraction', o.get('sparsity', o.get('n_m')))}")
        elif name == "distill":
            parts.append(f"kd {o['train']['max_steps']}")
        elif name == "quantize":
            parts.append(o["method"] + (f" w{o['bits']}" if "bits" in o else "")
                         + (f" g{o['group_size']}" if o.get("group_size") else ""))
        else:
            parts.append(f"{o['format']} {o.get('type', '')}" + (f" {o['method']}" if o.get("method") else "")
                         + (" imatrix" if o.get("importance") else "")
                         + (f" emb {o['embed_type']}" if o.get("embed_type") else ""))
    return " + ".join(parts) or "unchanged"


def _rel(plan, trial, index: int) -> str:
    base = trial.user_attrs["numbers"]["baseline"]
    metric = plan.quality[0] if index == 0 else plan.objective.name
    b = base.get(metric)
    return f" ({trial.values[index] / b - 1:+.1%})" if b else ""


def progress_line(study, plan, total: int) -> str:
    """One line per finished trial: what it was, its numbers, and the current front within budget."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    if not finished:
        return "no trial finished yet"
    last = max(finished, key=lambda t: t.datetime_complete or t.datetime_start)
    head = f"trial {last.number} ({len(finished)}/{total}) {describe(last)}: "
    if last.state != TrialState.COMPLETE:
        head += f"{last.state.name.lower()}: {last.user_attrs.get('error', 'stopped')}"
    else:
        ok = "within budget" if feasible(last) else "over budget"
        hit = " (reused)" if last.user_attrs.get("reused") else ""
        head += (f"{plan.quality[0]} {last.values[0]:.4g}{_rel(plan, last, 0)}, {plan.objective.name} "
                 f"{last.values[1]:.4g}{_rel(plan, last, 1)}, {ok}{hit}")
    front = pareto(plan, [t for t in _complete(study) if feasible(t)])
    shown = ", ".join(f"#{t.number} {t.values[1]:.4g} @ {plan.quality[0]} {t.values[0]:.4g}" for t in front[:4])
    return f"{head} | front within budget: {shown or 'none yet'}"


def _measure(plan, out: Path, variants: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    """Full eval of each variant (cached by weights) and ``rounds`` interleaved bench rounds; in place."""
    from types import SimpleNamespace

    from lmslim.recipes.run import Measurer
    from lmslim.recipes.schema import BenchSettings, DataRoles, EvalSettings

    cfg, s = plan.config, plan.settings
    data = DataRoles(eval=s.data["eval"])
    eval_only = SimpleNamespace(data=data, eval=EvalSettings(max_tokens=cfg.full_tokens),
                                bench=BenchSettings(enabled=False, threads=cfg.threads))
    bench_only = SimpleNamespace(data=data, eval=EvalSettings(enabled=False),
                                 bench=BenchSettings(**{**s.bench, **FULL_BENCH}, threads=cfg.threads))
    evals = Measurer(eval_only, cfg.threads, out / "cache" / "measure")
    benches = Measurer(bench_only, cfg.threads, None)  # timings are never reused
    scratch = out / "cache" / "front-rounds"
    for i, v in enumerate(variants):
        d = scratch / f"{i:02d}-eval"
        d.mkdir(parents=True, exist_ok=True)
        say(f"front: full eval {i + 1}/{len(variants)} ({v['label']})")
        v["eval"] = evals.measure(v["spec"], v["weights"], d, v["engine"])["eval"]
        v["rounds"] = []
    for r in range(cfg.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            d = scratch / f"r{r}-{variants.index(v):02d}"
            d.mkdir(parents=True, exist_ok=True)
            say(f"front: bench round {r + 1}/{cfg.rounds} ({v['label']})")
            v["rounds"].append(benches.measure(v["spec"], v["weights"], d, v["engine"])["bench"])
    for v in variants:
        bench = dict(v["rounds"][0])
        for k in ("decode_tokens_per_s", "prefill_ms_p50", "prefill_tokens_per_s", "decode_ms_per_token_p50"):
            vals = [b[k] for b in v["rounds"] if b.get(k) is not None]
            if vals:
                bench[k] = statistics.median(vals)
        bench["rounds_decode_tokens_per_s"] = [b.get("decode_tokens_per_s") for b in v["rounds"]]
        v["bench"] = bench
    shutil.rmtree(scratch, ignore_errors=True)


def _variant_spec(out: Path, trial) -> str:
    res = json.loads((out / "trials" / trial.user_attrs["recipe"] / "results.json").read_text())
    last = res["variants"][-1]
    if last["stage"] is None or not last.get("model"):
        return res["input"]["spec"]
    return str(out / "trials" / trial.user_attrs["recipe"] / Path(last["model"]).name)


def _value(v: dict, metric: str) -> float | None:
    return (v.get("eval") or {}).get(metric, (v.get("bench") or {}).get(metric))


def finish(study, plan, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Re-measure the front, write best.yaml, search.json and the report; returns the summary."""
    from filelock import FileLock

    with FileLock(str(out / ".finish.lock")):  # workers finishing together measure the front once
        complete = _complete(study)
        numbers = sorted(t.number for t in complete)
        done = out / "search.json"
        if done.is_file() and json.loads(done.read_text()).get("trial_numbers") == numbers:
            say("the front of these trials is already measured")
            return json.loads(done.read_text())
        return _finish(study, plan, out, say, complete)


def _finish(study, plan, out: Path, say: Callable[[str], None], complete: list) -> dict[str, Any]:
    from lmslim.modelio import resolve

    cfg = plan.config
    numbers = sorted(t.number for t in complete)
    within = [t for t in complete if feasible(t)]
    chosen = spread(plan, pareto(plan, within) or pareto(plan, complete), cfg.front_max)
    base = {"label": "input model", "spec": cfg.model, "weights": resolve(cfg.model).weights_hash(),
            "engine": "torch"}
    variants = [base] + [{"label": f"#{t.number} {describe(t)}", "spec": _variant_spec(out, t), "trial": t,
                          "weights": t.user_attrs["numbers"]["weights_sha256"],
                          "engine": t.user_attrs["numbers"]["engine"]} for t in chosen]
    if variants[1:]:
        _measure(plan, out, variants, say)
    front_rows, best = [], None
    for v in variants[1:]:
        t = v["trial"]
        ok = all(term.violation(_value(v, term.metric), _value(base, term.metric)) <= 0
                 if _value(v, term.metric) is not None else False for term in plan.terms)
        row = {"trial": t.number, "recipe": t.user_attrs["recipe"], "describe": describe(t), "engine": v["engine"],
               "techniques": t.user_attrs.get("techniques"), "within_budget": ok,
               "proxy": {plan.quality[0]: t.values[0], plan.objective.name: t.values[1]},
               "full": {m: _value(v, m) for m in dict.fromkeys([*plan.metrics(), "size_mb"])},
               "rounds_decode_tokens_per_s": v["bench"].get("rounds_decode_tokens_per_s")}
        front_rows.append(row)
        better = lambda a, b: a > b if plan.objective.maximize else a < b  # noqa: E731
        if ok and (best is None or better(row["full"][plan.objective.name], best["full"][plan.objective.name])):
            best = row
    _write_front(out, plan, variants)
    if best is not None:
        stages = next(t.user_attrs["stages"] for t in chosen if t.number == best["trial"])
        recipe = plan.settings.recipe(stages, f"search-best-{best['recipe']}")
        recipe.update(eval={"max_tokens": cfg.full_tokens}, bench={**plan.settings.bench, **FULL_BENCH},
                      measure_each_stage=True)
        recipe["description"] = (f"lmslim search: fastest within {cfg.budget} ({plan.objective.name} in "
                                 f"{cfg.engine}), trial {best['trial']}")
        atomic_write_text(out / "best.yaml", yaml.safe_dump(recipe, sort_keys=False))
    summary = _summary(study, plan, front_rows, best, {"input": {m: _value(base, m) for m in plan.metrics()},
                                                       "trial_numbers": numbers})
    atomic_write_json(out / "search.json", summary)
    _report(out, variants)
    say(f"front re-measured: {len(front_rows)} variants; best within budget: "
        + (f"trial {best['trial']} ({best['describe']}) {plan.objective.name} {best['full'][plan.objective.name]:.4g}"
           if best else "none"))
    return summary


def _write_front(out: Path, plan, variants: list[dict[str, Any]]) -> None:
    base = variants[0]
    with atomic_dir(out / "front") as tmp:
        for i, v in enumerate(variants[1:]):
            t = v["trial"]
            d = tmp / f"{i:02d}-{t.user_attrs['recipe']}"
            d.mkdir()
            stages = t.user_attrs["stages"]
            atomic_write_text(d / "recipe.yaml", yaml.safe_dump(plan.settings.recipe(stages, f"search #{t.number}"),
                                                                sort_keys=False))
            last = next(iter(stages[-1])) if stages else "none"
            variants_json = [
                {"name": "input model", "stage": None, "model": base["spec"], "weights_sha256": base["weights"],
                 "eval": base["eval"], "bench": base["bench"], "stage_report": None},
                {"name": f"search #{t.number} · {len(stages) - 1}:{last}", "stage": last, "model": v["spec"],
                 "weights_sha256": v["weights"], "eval": v["eval"], "bench": v["bench"],
                 "stage_report": {"stages": stages, "describe": describe(t)}}]
            atomic_write_json(d / "results.json", {
                "kind": "compress", "recipe": f"search #{t.number}", "input": {"spec": base["spec"],
                                                                              "weights_sha256": base["weights"]},
                "task": "clm", "data": plan.settings.data, "variants": variants_json})


def _summary(study, plan, front_rows, best, extra) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete and t.datetime_start)
    singles = {}
    for t in complete:
        kinds = t.user_attrs.get("techniques") or []
        if len(kinds) == 1 and feasible(t):
            cur = singles.get(kinds[0])
            if cur is None or _key(plan, tuple(t.values))[1] < _key(plan, (cur["proxy"][0], cur["proxy"][1]))[1]:
                singles[kinds[0]] = {"trial": t.number, "describe": describe(t), "proxy": list(t.values)}
    return {"config": plan.config.identity() | {"trials": plan.config.trials}, "budget": plan.config.budget,
            "quality": plan.quality[0], "objective": plan.objective.name, "engine": plan.config.engine,
            "trials": {"total": len(trials), "complete": len(complete),
                       "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                       "failed": sum(t.state == TrialState.FAIL for t in trials),
                       "within_budget": sum(feasible(t) for t in complete),
                       "reused_results": sum(bool(t.user_attrs.get("reused")) for t in complete),
                       "stage_cache_hits": sum(t.user_attrs.get("numbers", {}).get("stage_cache_hits", 0)
                                               for t in complete)},
            "trial_seconds": seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "front": front_rows, "best": best, "best_single_technique_proxy": singles, **extra}


def _report(out: Path, variants: list[dict[str, Any]]) -> None:
    from lmslim.report.build import build_report

    fronts = sorted((out / "front").iterdir()) if (out / "front").is_dir() else []
    trials = sorted(p for p in (out / "trials").iterdir() if (p / "results.json").is_file())
    if fronts:
        build_report(fronts, out / "report", background_dirs=trials)
