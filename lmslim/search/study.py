"""``lmslim search``: a budgeted multi-objective search over stage combinations, measured in the engine.

Each trial draws a combination from the search space (``space``), runs it as a recipe through
``lmslim compress`` (``trials``) with short quality windows (the proxy), and reports two values to an
Optuna study: the quality metric and the objective (e.g. decode tokens/s in llama.cpp). The budget
is a constraint (Optuna's ``constraints_func``), so the sampler learns where the feasible region is
instead of discarding what it learnt from infeasible trials. Optuna's TPE sampler (default) or NSGA-II
draw the combinations (Watanabe 2023, https://arxiv.org/abs/2304.11127; Deb et al. 2002).

Stage outputs are cached by fingerprint across trials (``--stage-cache`` of compress), and eval/bench
results by weights, so a trial sharing a prefix with an earlier one does not redo it. The study lives
in ``DIR/study.db`` (SQLite) or in ``--storage URL``, so a killed search resumes where it stopped and
several workers can share one study: heartbeats mark a dead worker's trial failed and it is drawn
again. When every trial is done, the Pareto front is re-measured in full (``front``).

Example (the test suite runs this on a tiny model):
    lmslim search builtin:smollm2-135m --data builtin:wiki:test --calib builtin:wiki:train \\
        --budget "ppl<=+5%" --objective decode_tok_s --engine llama.cpp --trials 30 --out runs/search
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmslim.core.configs import show
from lmslim.core.errors import UserError
from lmslim.measure.engines import require_engine
from lmslim.search import budget as budget_mod
from lmslim.search import space as space_mod
from lmslim.search.trials import Settings, numbers, recipe_hash, run_trial

log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "nsga2")
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search run is given (the CLI's flags under the same names).

    Args:
        model: model spec. data / calib / train: data specs for eval, calibration, distillation.
        budget: ``"ppl<=+5%"`` etc. (``budget.parse_budget``). objective: a bench field (``decode_tok_s``).
        engine: llama.cpp | onnxruntime | torch. trials: finished trials the study should hold.
        time_s: wall-clock limit of this run (no new trial starts after it). storage: an Optuna URL.
        sampler: tpe | nsga2. space: a YAML file replacing dimensions' choices (``space``).
        proxy_tokens / full_tokens: perplexity tokens per trial / for the re-measured front.
        front_max: at most this many front variants are re-measured. rounds: interleaved bench rounds.
    """

    model: str
    data: str
    budget: str
    calib: str | None = None
    train: str | None = None
    objective: str = "decode_tok_s"
    engine: str = "llama.cpp"
    trials: int = 20
    time_s: float | None = None
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    space: str | None = None
    proxy_tokens: int = 4096
    full_tokens: int = 16384
    front_max: int = 6
    rounds: int = 2
    prompt_len: int = 128
    gen_len: int = 32
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.trials <= MAX_TRIALS:
            raise UserError(f"--trials must be in [1, {MAX_TRIALS}], got {self.trials}")
        if self.time_s is not None and self.time_s <= 0:
            raise UserError("--time must be positive")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {show(self.sampler)}; choose one of: {', '.join(SAMPLERS)}")
        for name in ("proxy_tokens", "full_tokens"):
            if not 16 <= getattr(self, name) <= 10_000_000:
                raise UserError(f"{name} must be in [16, 10000000]")
        if not 1 <= self.front_max <= 100 or not 1 <= self.rounds <= 20:
            raise UserError("front_max must be in [1, 100] and rounds in [1, 20]")
        if not 1 <= self.prompt_len <= 100_000 or not 1 <= self.gen_len <= 100_000:
            raise UserError("prompt_len and gen_len must be in [1, 100000]")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed or shared study must agree on (limits and storage may change)."""
        d = dataclasses.asdict(self)
        for k in ("trials", "time_s", "storage", "threads", "front_max", "rounds", "full_tokens"):
            d.pop(k)
        return d


@dataclass
class Plan:
    """A checked search: parsed budget and objective, the space, the settings each trial shares."""

    config: SearchConfig
    terms: tuple
    objective: budget_mod.Objective
    quality: tuple[str, bool]
    space: space_mod.Space
    settings: Settings

    def metrics(self) -> list[str]:
        """Every measured value the search reads: quality, objective, budget terms."""
        return list(dict.fromkeys([self.quality[0], self.objective.name, *(t.metric for t in self.terms)]))

    def directions(self) -> list[str]:
        return ["maximize" if self.quality[1] else "minimize", "maximize" if self.objective.maximize else "minimize"]


def prepare(config: SearchConfig) -> Plan:
    """Check everything before anything is written: budget, objective, engine, model, data, space."""
    terms = budget_mod.parse_budget(config.budget)
    objective = budget_mod.parse_objective(config.objective)
    if config.engine not in space_mod.ENGINES:
        raise UserError(f"unknown engine {show(config.engine)}; choose one of: {', '.join(space_mod.ENGINES)}")
    require_engine(config.engine)
    quality = budget_mod.quality_axis(terms, "clm")
    if quality[0] != "perplexity":
        raise UserError(f"search measures causal LMs by perplexity; {quality[0]} needs another task")
    hidden, layers = _model_shape(config.model)
    space = space_mod.default_space(config.engine, hidden, layers)
    if config.space is not None:
        space = space_mod.with_overrides(space, space_mod.load_overrides(Path(config.space)), hidden, layers)
    from lmslim.data.spec import load_data

    data = {"eval": config.data}
    for role, spec in (("calibration", config.calib or config.data), ("train", config.train or config.calib)):
        if spec:
            data[role] = spec
    if any(space.dims.get("kd_steps", (0,))) and "train" not in data:
        raise UserError("the space has distillation steps; give --train (or --calib) text to train on")
    for spec in dict.fromkeys(data.values()):
        load_data(spec, task="clm")
    settings = Settings(model=config.model, data=data,
                        eval={"max_tokens": config.proxy_tokens},
                        bench={"prompt_len": config.prompt_len, "gen_len": config.gen_len, "repeats": 3, "warmup": 1},
                        threads=config.threads)
    return Plan(config, terms, objective, quality, space, settings)


def _model_shape(spec: str) -> tuple[int, int]:
    from transformers import AutoConfig

    from lmslim.modelio import resolve

    resolved = resolve(spec)
    try:
        cfg = AutoConfig.from_pretrained(str(resolved.path) if resolved.path else spec, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config of {spec}: {str(e).splitlines()[0][:200]}") from None
    cfg = getattr(cfg, "text_config", cfg)
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)


def open_study(plan: Plan, root: Path):
    """The Optuna study in ``root`` (or ``--storage``), created or resumed; its settings must match."""
    import optuna
    from filelock import FileLock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = plan.config.storage or f"sqlite:///{(root / 'study.db').resolve()}"
    try:  # workers starting together must not both create the schema (SQLite: "UNIQUE constraint failed")
        with FileLock(str(root / ".study.lock")):
            return _check_settings(_open(plan, url), plan, url)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors for a bad URL or unreachable server vary
        raise UserError(f"cannot open --storage {plan.config.storage or url}: {str(e).splitlines()[0][:200]}") from None


def _open(plan: Plan, url: str):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # SQLite: wait for another worker's write instead of failing at once.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    # Heartbeats: a trial whose worker died is marked failed after the grace period and drawn again.
    storage = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=10, grace_period=40,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    # The budget reaches the samplers as each trial's constraints (Trial.set_constraint, ≤ 0: feasible).
    sampler = (optuna.samplers.NSGAIISampler(seed=plan.config.seed) if plan.config.sampler == "nsga2" else
               optuna.samplers.TPESampler(seed=plan.config.seed, multivariate=True, group=True,
                                          n_startup_trials=6))
    return optuna.create_study(storage=storage, study_name="lmslim-search", directions=plan.directions(),
                               sampler=sampler, load_if_exists=True)


def _check_settings(study, plan: Plan, url: str):
    identity = plan.config.identity()
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", identity)
    elif stored != identity:
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        raise UserError(f"the study in {url} was started with other settings ({', '.join(changed)}); "
                        "use a new --out or the same settings")
    return study


def fail_stale_trials(study) -> None:
    from optuna.storages import fail_stale_trials as fail

    fail(study)


def _counts(study) -> tuple[int, int]:
    """(finished trials that count toward --trials, running ones)."""
    from optuna.trial import TrialState

    done = running = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:  # ours, not a dead worker's (retried)
            done += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return done, running


def make_objective(plan: Plan, root: Path):
    """The Optuna objective: draw, run the recipe, store what the front and the report need."""
    import optuna

    def objective(trial) -> tuple[float, float]:
        params = space_mod.suggest(trial, plan.space)
        stages = space_mod.stages_for(params, plan.space)
        key = recipe_hash(stages, plan.settings)
        trial.set_user_attr("recipe", key)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("stages", stages)
        trial.set_user_attr("techniques", space_mod.techniques(stages))
        t0 = time.perf_counter()
        try:
            results, reused = run_trial(root, stages, plan.settings)
        except UserError as e:
            trial.set_user_attr("error", str(e))
            raise optuna.TrialPruned(str(e)) from None  # a combination this model cannot take
        nums = numbers(results, plan.metrics())
        final, base = nums["final"], nums["baseline"]
        missing = [m for m in plan.metrics() if final.get(m) is None]
        if missing:
            trial.set_user_attr("error", f"trial {key} measured no {', '.join(missing)}")
            raise optuna.TrialPruned(trial.user_attrs["error"])
        q, o = final[plan.quality[0]], final[plan.objective.name]
        violations = [t.violation(final[t.metric], base.get(t.metric)) for t in plan.terms]
        trial.set_user_attr("constraints", violations)
        for term, v in zip(plan.terms, violations):
            trial.set_constraint(term.text, v)
        trial.set_user_attr("numbers", nums)
        trial.set_user_attr("reused", reused)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return q, o

    return objective


def run_search(config: SearchConfig, out: Path, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run (or resume, or join) the search in ``out``; returns the summary written to ``out/search.json``."""
    from lmslim.core.guard import check_no_overlap, check_writable
    from lmslim.search.front import finish, progress_line

    plan = prepare(config)
    out = Path(out)
    inputs = [config.model, config.data, config.calib, config.train, config.space]
    check_no_overlap(out, inputs, "--out")
    check_writable(out, "--out", inside=out.exists())
    if out.exists() and not (out / "search.yaml").is_file() and any(out.iterdir()):
        raise UserError(f"output {out} exists and is not a search folder; choose a new --out")
    _check_storage_url(config.storage)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(plan, out)
    except UserError:
        if created:  # nothing of a run that could not start stays behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    _write_settings(out, config)
    t0 = time.monotonic()
    objective = make_objective(plan, out)
    waited = False
    while True:
        fail_stale_trials(study)  # a dead worker's trial: failed after the grace period, then drawn again
        done, running = _counts(study)
        out_of_time = config.time_s is not None and time.monotonic() - t0 >= config.time_s
        if done >= config.trials or out_of_time:
            if not running:
                break
            if not waited:
                say(f"waiting for {running} trial(s) of other workers")
                waited = True
            time.sleep(5)  # the last worker to finish measures the front
            continue
        if done + running >= config.trials:  # the remaining trials are being run elsewhere
            time.sleep(5)
            continue
        study.optimize(objective, n_trials=1, catch=())
        say(progress_line(study, plan, config.trials))
    if out_of_time and done < config.trials:
        say(f"time limit reached after {done} of {config.trials} trials; measuring the front found so far "
            "(run the command again to continue the study)")
    return finish(study, plan, out, say)


def _check_storage_url(url: str | None) -> None:
    """A storage URL SQLAlchemy cannot even parse, or whose driver is missing, fails before anything is made."""
    if url is None:
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect()
    except Exception as e:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, ImportError of a driver
        raise UserError(f"cannot open --storage {url}: {str(e).splitlines()[0][:200]}") from None


def _write_settings(out: Path, config: SearchConfig) -> None:
    """``search.yaml``: the settings a resumed or joining run is compared with (by the study, too)."""
    import yaml

    from lmslim.core.io import atomic_write_text

    path = out / "search.yaml"
    if not path.is_file():
        atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
