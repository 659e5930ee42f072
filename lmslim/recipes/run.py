"""Run a recipe: stages in order, with quality and cost measured before and after each one.

Layout of the output folder ``DIR`` (built in ``.DIR.partial`` next to it and renamed into place
only when every stage and measurement is done, so ``DIR`` is never half-written)::

    DIR/model/                 the final model (loadable by every lmslim command)
    DIR/recipe.yaml            the resolved recipe (overrides applied, model filled in)
    DIR/results.json           every variant: baseline, then one per stage, with eval + bench
    DIR/baseline/{eval,bench}.json
    DIR/stages/NN-name/{stage,eval,bench,done}.json   (and model/ with keep_intermediate)

Resuming: a stage whose ``done.json`` carries the fingerprint of its input and options is skipped
when the command is run again after an interruption; the fingerprint chains, so changing one stage
re-runs it and everything after it.

Measurements run in a fresh ``lmslim eval`` / ``lmslim bench`` process each, so peak memory is the
variant's own and not the pipeline's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lmslim.core.errors import UserError
from lmslim.core.faults import failpoint
from lmslim.core.progress import LineProgress
from lmslim.core.io import atomic_dir, atomic_write_json, atomic_write_text, publish_dir
from lmslim.modelio import save_model
from lmslim.recipes.stage_cache import StageCache, link_or_copy

log = logging.getLogger(__name__)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Measurer:
    """Runs ``lmslim eval`` / ``lmslim bench`` in subprocesses, caching results by weights + settings."""

    def __init__(self, recipe, threads: int | None, cache_dir: Path | None = None, stream: dict | None = None):
        self.recipe = recipe
        self.threads = threads if threads is not None else recipe.bench.threads
        self.cache_dir = cache_dir
        # --stream: perplexity one block at a time (same number, ``lmslim eval --stream``); no benchmark,
        # which would load the whole model
        self.stream = stream

    def _cli(self, args: list[str], what: str) -> None:
        env = dict(os.environ)
        proc = subprocess.run([sys.executable, "-m", "lmslim", *args], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"{what} failed: {last}")

    def _key(self, kind: str, weights: str | None, settings: dict) -> str:
        return _fingerprint(kind, weights, settings)

    def measure(self, spec: str, weights: str | None, out_dir: Path, engine: str = "torch") -> dict[str, dict]:
        """eval.json and bench.json for ``spec`` in ``out_dir`` (run in ``engine``); returns both (absent ones omitted)."""
        r = self.recipe
        results = {}
        jobs = []
        in_engine = [] if engine == "torch" else ["--engine", engine]
        if r.eval.enabled:
            e = r.eval
            args = ["eval", spec, "--data", r.data.eval, "--task", e.task, "--batch-size", str(e.batch_size),
                    "--window", str(e.window), "--stride", str(e.stride)]
            if e.max_tokens is not None and e.task == "clm":
                args += ["--max-tokens", str(e.max_tokens)]
            if self.stream is not None:
                args += ["--stream"] + [a for k, v in self.stream.items() if v is not None
                                        for a in (f"--{k.replace('_', '-')}", str(v))]
            jobs.append(("eval", args + in_engine, {"eval": e.model_dump(), "data": r.data.eval, "engine": engine}))
        if r.bench.enabled and self.stream is None:
            b = r.bench
            args = ["bench", spec, "--prompt-len", str(b.prompt_len), "--gen-len", str(b.gen_len),
                    "--repeats", str(b.repeats), "--warmup", str(b.warmup)]
            jobs.append(("bench", args + in_engine, {"bench": b.model_dump(exclude={"threads"}), "engine": engine}))
        for kind, args, settings in jobs:
            target = out_dir / f"{kind}.json"
            cached = self.cache_dir / f"{self._key(kind, weights, settings)}.json" if self.cache_dir and weights else None
            if cached is not None and cached.is_file():
                shutil.copyfile(cached, target)
            else:
                if self.threads:
                    args += ["--threads", str(self.threads)]
                self._cli(args + ["--json", str(target)], f"{kind} of {spec}")
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(target, cached)
            results[kind] = json.loads(target.read_text())
        return results


def artifact_hash(path: Path) -> str:
    """SHA-256 of an exported file, or of a folder's files in name order (an ONNX export)."""
    from lmslim.core.io import sha256_files

    path = Path(path)
    return sha256_files(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])


def _variant(name: str, stage: str | None, spec: str, weights: str | None, measured: dict, report: dict | None
             ) -> dict:
    return {"name": name, "stage": stage, "model": spec, "weights_sha256": weights,
            "eval": measured.get("eval"), "bench": measured.get("bench"), "stage_report": report}


def recipe_inputs(recipe) -> list[str]:
    """Every spec a recipe reads besides its model: data of each role, and models named by stages (a teacher)."""
    specs = [v for v in recipe.data.model_dump().values() if v]
    for stage in recipe.stages:
        for key in ("teacher", "student", "student_config", "tokenizer"):
            value = stage.options.get(key)
            if isinstance(value, str) and value != "input":
                specs.append(value)
    return specs


def _check_data(recipe, stage_objs) -> None:
    """Load every data set the recipe will use, so a bad spec fails before any work is done."""
    from lmslim.data.spec import load_data
    from lmslim.recipes.stages import STAGES

    roles = {role for spec, obj in zip(recipe.stages, stage_objs) for role in STAGES[spec.name].needs(obj)}
    task = recipe.eval.task
    for role in sorted(roles):
        load_data(getattr(recipe.data, role), task="clm" if role == "calibration" else task)
    if recipe.eval.enabled:
        load_data(recipe.data.eval, task=task)


def compress(model_spec: str, recipe, raw: dict, out: Path, *, overwrite: bool = False, threads: int | None = None,
             measure_cache: Path | None = None, stage_cache: Path | None = None, sources: tuple = (),
             stream: bool = False, max_activation_mb: float | None = None) -> dict:
    """Run ``recipe`` on ``model_spec`` into ``out``; returns the results dict (also in results.json).

    ``sources``: files the recipe was read from; like every input they must not be under ``out``.
    ``stage_cache``: a folder of finished stages shared with other runs (``lmslim.recipes.stage_cache``).
    ``stream``: never load the whole model: every stage streams one block at a time
    (``lmslim.compress.streaming``; streamable quantize and prune methods only), perplexity is measured
    the same way, and nothing is benchmarked (a benchmark runs the whole model).
    """
    from lmslim.core.guard import check_no_overlap, check_output
    from lmslim.modelio import resolve
    from lmslim.core.runtime import Runtime
    from lmslim.recipes.single import check_stream_options
    from lmslim.recipes.stages import validate_stages

    out = Path(out)
    inputs = [model_spec, *sources, *recipe_inputs(recipe)]
    for flag, cache in (("--measure-cache", measure_cache), ("--stage-cache", stage_cache)):
        if cache is not None:
            check_no_overlap(cache, [*inputs, out], flag)
    for i, stage in enumerate(recipe.stages):  # stage outputs besides the model (a distillation teacher cache)
        if isinstance(stage.options.get("teacher_cache"), str):
            check_no_overlap(Path(stage.options["teacher_cache"]), [*inputs, out], f"stages.{i}.teacher_cache")
    check_stream_options(stream, max_activation_mb)
    with check_output(out, inputs=inputs, overwrite=overwrite) or contextlib.nullcontext():
        stage_objs = validate_stages(recipe)
        resolved = resolve(model_spec)
        streaming = _check_stream(recipe, stage_objs, resolved, max_activation_mb) if stream else None
        _check_data(recipe, stage_objs)
        runtime = Runtime.create(device="cpu", threads=threads if threads is not None else recipe.bench.threads)
        work = out.parent / f".{out.name}.partial"  # resumable; only this run writes it (the lock above)
        work.mkdir(parents=True, exist_ok=True)
        cache = StageCache(stage_cache) if stage_cache is not None else None
        return _compress(model_spec, recipe, raw, out, work, stage_objs, resolved, runtime, threads, measure_cache,
                         cache, streaming)


def _check_stream(recipe, stage_objs, resolved, max_activation_mb: float | None) -> dict:
    """One-line refusals for a recipe ``--stream`` cannot run; the run control recorded in results.json."""
    from lmslim.compress.streaming import check_stage_streamable
    from lmslim.recipes.single import check_stream_source

    check_stream_source(resolved)
    for i, (spec, obj) in enumerate(zip(recipe.stages, stage_objs)):
        try:
            check_stage_streamable(spec.name, getattr(obj, "config", None))
        except UserError as e:
            raise UserError(f"stages.{i}: {e}") from None
    if recipe.eval.enabled and recipe.eval.task != "clm":
        raise UserError(f"--stream measures perplexity (eval.task clm), not {recipe.eval.task}; "
                        "set eval.enabled: false or run without --stream")
    return {"max_activation_mb": max_activation_mb,
            "bench": "not measured: --stream never loads the whole model, and a benchmark runs all of it"
            if recipe.bench.enabled else "disabled by the recipe"}


def _compress(model_spec, recipe, raw, out: Path, work: Path, stage_objs, resolved, runtime, threads,
              measure_cache, stage_cache: StageCache | None, streaming: dict | None = None) -> dict:
    keep_cache = streaming is None  # a streamed model may not fit in memory: its hash reads must not stay cached
    input_hash = resolved.weights_hash(keep_cache=keep_cache)
    _undo_final_move(work)
    raw = dict(raw, model=model_spec)
    atomic_write_text(work / "recipe.yaml", yaml.safe_dump(raw, sort_keys=False))
    measurer = Measurer(recipe, threads, measure_cache,
                        None if streaming is None else {"max_activation_mb": streaming["max_activation_mb"]})
    t_start = time.perf_counter()
    say = _stage_lines(len(recipe.stages))
    say("measuring the input model", 0)

    base_dir = work / "baseline"
    base_dir.mkdir(exist_ok=True)
    variants = [_variant("baseline", None, model_spec, input_hash, measurer.measure(model_spec, input_hash, base_dir),
                         None)]
    prev_spec, prev_fp, prev_dir, prev_weights = model_spec, _fingerprint(model_spec, input_hash), None, input_hash
    label = recipe.name or "recipe"
    n = len(recipe.stages)
    for i, (spec, obj) in enumerate(zip(recipe.stages, stage_objs)):
        sdir = work / "stages" / f"{i:02d}-{spec.name}"
        # a streamed stage writes the same weights in another layout (sharded): not the same cache entry
        fp = _fingerprint(prev_fp, spec.name, spec.options, recipe.data.model_dump(), recipe.eval.task,
                          *(("stream",) if streaming is not None else ()))
        done = sdir / "done.json"
        measure_now = recipe.measure_each_stage or i == n - 1
        if _finished(sdir, fp):
            log.info("stage %d (%s) already done; skipping", i, spec.name)
            say(f"stage {i + 1} ({spec.name}) already done; reused", i + 1)
        elif stage_cache is not None and stage_cache.fetch(fp, sdir) and _finished(sdir, fp):
            say(f"stage {i + 1} ({spec.name}) reused from the stage cache", i + 1)
        else:
            say(f"stage {i + 1} ({spec.name}) running", i)
            if streaming is None:
                _run_stage(i, spec, obj, prev_spec, model_spec, recipe, runtime, sdir, fp)
            else:
                _run_stage_streamed(spec, obj, prev_spec, recipe, runtime, sdir, fp, streaming["max_activation_mb"])
            if stage_cache is not None:
                stage_cache.store(fp, sdir)
            say(f"stage {i + 1} ({spec.name}) finished", i + 1)
        record = json.loads(done.read_text())
        stage_report = json.loads((sdir / "stage.json").read_text())["report"]
        artifact = stage_report.get("artifact")
        if measure_now and record["weights_sha256"] != variants[-1]["weights_sha256"] and not any(
                (sdir / f"{k}.json").is_file() for k in ("eval", "bench")):
            say(f"stage {i + 1} ({spec.name}) measuring", i)
            measured_spec = str(sdir / artifact) if artifact else str(sdir / "model")
            measurer.measure(measured_spec, record["weights_sha256"], sdir, stage_report.get("engine") or "torch")
        measured = {k: json.loads((sdir / f"{k}.json").read_text()) for k in ("eval", "bench")
                    if (sdir / f"{k}.json").is_file()}
        if record["weights_sha256"] == variants[-1]["weights_sha256"]:
            log.info("stage %d (%s) left the weights unchanged; no new variant", i, spec.name)
        elif measured:
            variants.append(_variant(f"{label} · {i}:{spec.name}", spec.name,
                                     f"stages/{sdir.name}/{artifact or 'model'}",
                                     record["weights_sha256"], measured, stage_report))
        prev_spec, prev_fp, prev_dir, prev_weights = str(sdir / "model"), fp, sdir, record["weights_sha256"]

    artifact = _take_final(work, prev_dir, recipe.keep_intermediate)
    for v in variants[1:]:  # where each variant's model is once DIR is published (None: not kept)
        kept = recipe.keep_intermediate and v["model"] is not None
        v["model"] = v["model"] if kept else None
    if variants[-1]["stage"] is not None and variants[-1]["weights_sha256"] == prev_weights:
        variants[-1]["model"] = artifact or "model"
    results = {"kind": "compress", "recipe": label, "input": {"spec": model_spec, "weights_sha256": input_hash},
               "task": recipe.eval.task, "data": recipe.data.model_dump(),
               "variants": _relocate(variants, work, out), "seconds": time.perf_counter() - t_start,
               "stage_cache_hits": stage_cache.hits if stage_cache is not None else 0}
    if streaming is not None:
        results["stream"] = streaming
    atomic_write_json(work / "results.json", results)
    (work / "final.json").unlink()
    publish_dir(work, out)  # DIR appears in one rename, results.json inside
    say(f"published {out}", n)
    return results


def _take_final(work: Path, last_dir: Path, keep_intermediate: bool) -> str | None:
    """Move the last stage's model (and its export, if any) to ``work``; drop the others' models unless kept.

    Returns the export's name (``model.gguf``, ``model-onnx``) or None.
    """
    # a note says where the model came from, so a run killed between this move and publishing
    # puts it back on the next start (_undo_final_move)
    atomic_write_json(work / "final.json", {"stage_dir": last_dir.name})
    os.replace(last_dir / "model", work / "model")
    artifact = json.loads((last_dir / "stage.json").read_text())["report"].get("artifact")
    if artifact:  # the export (the last stage) beside the model it was made from: DIR/model.gguf, DIR/model-onnx
        os.replace(last_dir / artifact, work / artifact)
    failpoint("compress-final")
    if not keep_intermediate:  # kept until now so any interrupted run could resume
        for d in (work / "stages").iterdir():
            if (d / "model").exists():
                shutil.rmtree(d / "model")
    return artifact


def _finished(sdir: Path, fp: str) -> bool:
    """The stage folder holds a finished stage for exactly these inputs and options."""
    done = sdir / "done.json"
    return done.is_file() and json.loads(done.read_text()).get("fingerprint") == fp and (sdir / "model").is_dir()


def _run_stage(i: int, spec, obj, prev_spec: str, model_spec: str, recipe, runtime, sdir: Path, fp: str) -> None:
    """Run stage ``i`` on ``prev_spec`` into ``sdir``: model/, stage.json, any artifact, then done.json."""
    from lmslim.modelio import load_model
    from lmslim.recipes.stages import STAGES, StageContext

    kind = STAGES[spec.name]
    _empty(sdir)
    t0 = time.perf_counter()
    lm = load_model(prev_spec, task=recipe.eval.task, dtype=runtime.dtype, device=runtime.device)
    ctx = StageContext(recipe=recipe, runtime=runtime, work_dir=sdir / "scratch", input_spec=model_spec)
    artifact = kind.artifact(obj)
    if artifact:  # an export: the stage's model is the one exported, saved before the export rounds it
        with atomic_dir(sdir / "model") as tmp:
            prev = Path(prev_spec)
            if prev.parent.parent == sdir.parent and prev.is_dir():
                # the previous stage's folder of this run: its files, hard-linked. Never a user's input,
                # which may be rewritten in place later (save_pretrained truncates files) under a link.
                shutil.copytree(prev, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
            else:
                save_model(lm.model, lm.tokenizer, tmp)
    model, tokenizer, report = kind.run(lm, obj, ctx)
    if not artifact:
        with atomic_dir(sdir / "model") as tmp:
            save_model(model, tokenizer, tmp)
    failpoint("compress-stage")
    del lm, model
    if (sdir / "scratch").exists():
        shutil.rmtree(sdir / "scratch")
    _finish_stage(spec, sdir, fp, report, t0, artifact)


def _run_stage_streamed(spec, obj, prev_spec: str, recipe, runtime, sdir: Path, fp: str,
                        max_activation_mb: float | None) -> None:
    """``_run_stage`` with one block in memory at a time (``lmslim.recipes.single.stream_stage``)."""
    from lmslim.modelio import resolve
    from lmslim.recipes.single import stream_stage

    _empty(sdir)
    t0 = time.perf_counter()
    report = stream_stage(recipe, spec.name, obj, resolve(prev_spec).path, sdir / "model", runtime,
                          max_activation_mb=max_activation_mb)
    failpoint("compress-stage")
    _finish_stage(spec, sdir, fp, report, t0, None, keep_cache=False)


def _empty(sdir: Path) -> None:
    """A stage folder with nothing in it (what an interrupted attempt left is removed)."""
    if sdir.exists():
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True)


def _finish_stage(spec, sdir: Path, fp: str, report: dict | None, t0: float, artifact: str | None,
                  keep_cache: bool = True) -> None:
    """stage.json (the report), then done.json with the fingerprint and the weights' hash: the stage is done."""
    from lmslim.modelio import resolve

    report = dict(report or {}, seconds_total=time.perf_counter() - t0)
    atomic_write_json(sdir / "stage.json", {"stage": spec.name, "options": spec.options, "report": report})
    weights = (artifact_hash(sdir / artifact) if artifact
               else resolve(str(sdir / "model")).weights_hash(keep_cache=keep_cache))
    atomic_write_json(sdir / "done.json", {"fingerprint": fp, "weights_sha256": weights})


def _relocate(obj: Any, work: Path, out: Path) -> Any:
    """Rewrite paths under the work folder (as measured) to where they are after the rename into ``out``."""
    if isinstance(obj, dict):
        return {k: _relocate(v, work, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, work, out) for v in obj]
    if isinstance(obj, str):
        for old in {str(work), str(work.resolve())}:
            if obj == old or obj.startswith(old + os.sep):
                return str(out) + obj[len(old):]
    return obj


def _undo_final_move(work: Path) -> None:
    """Put a final model that was moved out of its stage folder back (the run stopped before publishing)."""
    note = work / "final.json"
    if not (work / "model").exists():
        note.unlink(missing_ok=True)
        return
    stage_dir = json.loads(note.read_text()).get("stage_dir") if note.is_file() else None
    target = work / "stages" / stage_dir / "model" if stage_dir else None
    if target is not None and target.parent.is_dir() and not target.exists():
        os.replace(work / "model", target)
    else:
        shutil.rmtree(work / "model")
    note.unlink(missing_ok=True)


def _stage_lines(stages: int):
    """``say(message, finished_stages)``: a progress line per compress event when stderr is not a terminal.

    On a terminal the stages' own bars show progress and these lines would only clutter it.
    """
    if sys.stderr.isatty():
        return lambda message, done: None
    lines = LineProgress("compress", stages, interval_s=0.0, logger=log, unit="stage")
    return lambda message, done: lines.update(done, message, force=True)
