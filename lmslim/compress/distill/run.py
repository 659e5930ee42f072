"""One distillation run: build the student, fit its blocks (optional), train it against the teacher.

:func:`distill_student` is the run itself, shared by ``lmslim distill`` and the recipe stage
``distill`` (which ``lmslim distill`` runs as a one-stage recipe); :func:`run_distill` is the same from
specs, for Python callers. The pieces (``student_from_layers``, ``DistillObjective``,
``lmslim.train.loop.train``) can also be used directly.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> from lmslim.compress.distill import DistillConfig
    >>> from lmslim.compress.distill.run import run_distill
    >>> from lmslim.train.config import TrainConfig
    >>> out = Path(tempfile.mkdtemp()) / "student"
    >>> s = run_distill(teacher="builtin:tiny-llama", student_layers="2", data="builtin:wiki:test", out_dir=out,
    ...                 distill_config=DistillConfig(), train_config=TrainConfig(max_steps=2), untrained=True)
    >>> s["student"]["layers"]
    1
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lmslim.compress.distill.api import DistillConfig, distill
from lmslim.compress.distill.losses import mean_pooled
from lmslim.compress.distill.student import (check_same_vocabulary, parse_layers, read_config_file,
                                             student_from_config, student_from_layers)
from lmslim.compress.share import unique_params
from lmslim.core.errors import UserError

log = logging.getLogger(__name__)


def build_student(teacher_lm: Any, *, student: str | None = None, student_layers: str | None = None,
                  student_config: Path | None = None, anchor: str = "first", task: str = "clm",
                  device: torch.device | str = "cpu", trust_remote_code: bool = False) -> tuple[Any, Any, dict]:
    """The student model, its tokenizer and a description of where it came from (exactly one source)."""
    from lmslim.compress.calibration import transformer_blocks
    from lmslim.modelio import load_model

    if sum(x is not None for x in (student, student_layers, student_config)) != 1:
        raise UserError("give exactly one of --student MODEL, --student-layers K and --student-config FILE")
    teacher = teacher_lm.model
    if student_layers is not None:
        n = len(transformer_blocks(teacher)[1])
        layers = parse_layers(str(student_layers), n, anchor)
        model = student_from_layers(teacher, layers)
        return model, teacher_lm.tokenizer, {"source": "teacher-layers", "kept": layers, "anchor": anchor}
    if student_config is not None:
        fields = read_config_file(Path(student_config))
        model = student_from_config(teacher, fields).to(device)
        return model, teacher_lm.tokenizer, {"source": "config", "file": str(student_config)}
    lm = load_model(student, task="clm" if task == "clm" else "embed", dtype=torch.float32, device=device,
                    trust_remote_code=trust_remote_code)
    return lm.model, lm.tokenizer, {"source": "model", "spec": student, "weights_sha256": lm.resolved.weights_hash()}


def embed_set(data: Any, tokenizer: Any, max_length: int) -> Any:
    """Sentences as training examples for embedding distillation.

    The loss is a mean over sentences, so each row is one loss unit: that is how the training engine
    collates ``seq-cls`` rows, hence that task tag (the class label is a placeholder, never used).
    """
    from lmslim.train.data import TokenizedSet

    texts = [t for t in (data.documents or list(dict.fromkeys(data.texts + data.texts_b))) if t.strip()]
    if not texts:
        raise UserError(f"data {data.spec} has no sentences for embedding distillation")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    examples = [{"input_ids": x, "labels": 0} for x in ids if len(x) > 0]
    return TokenizedSet("seq-cls", examples, tokenizer.pad_token_id, tokenizer, ["sentence"], data)


def embedding_evaluator(teacher: Any, eval_set: Any, runtime: Any, batch_size: int = 32):
    """Evaluation for embedding distillation: mean cosine of student vs teacher pooled embeddings."""
    from lmslim.train.data import collate

    def evaluate(model: Any) -> dict[str, float]:
        sims = []
        with torch.no_grad():
            for i in range(0, len(eval_set), batch_size):
                batch = collate(eval_set.examples[i:i + batch_size], "seq-cls", eval_set.pad_id)
                inputs = {k: batch[k].to(runtime.device) for k in ("input_ids", "attention_mask")}
                s = mean_pooled(model(**inputs).last_hidden_state, inputs["attention_mask"])
                t = mean_pooled(teacher(**inputs).last_hidden_state, inputs["attention_mask"])
                sims.append(torch.nn.functional.cosine_similarity(s.float(), t.float(), dim=-1))
        mean = float(torch.cat(sims).mean())
        return {"eval_loss": 1.0 - mean, "mean_cosine": mean}

    return evaluate


def distill_student(teacher: Any, student: Any, tokenizer: Any, *, train_raw: Any, eval_raw: Any,
                    distill_config: DistillConfig, train_config: Any, runtime: Any, out_dir: Path | None,
                    blockwise: Any = None, teacher_cache: Path | None = None, top_k: int = 64,
                    teacher_hash: str | None = None, resume: bool = False, resume_changes: Sequence[str] = (),
                    callbacks: Sequence[Any] = (), train: bool = True, clear_out_dir: bool = False
                    ) -> tuple[Any, dict[str, Any]]:
    """The one distillation run behind ``lmslim distill``, the recipe stage ``distill`` and :func:`run_distill`.

    Optionally fits the student's blocks to the teacher's first (``blockwise``; skipped on ``resume``,
    whose checkpoint already holds the fitted blocks), then trains the student in place against the
    frozen teacher with the training engine.

    Args:
        train_raw, eval_raw: loaded data (``lmslim.data.spec.load_data``) for training and validation.
        out_dir: where the training loop writes checkpoints, ``metrics.jsonl`` and the final (best) model.
        teacher_cache, top_k: cache the teacher's top-k logits in this folder and reuse them (clm, logit KD).
        callbacks: training-loop callbacks (e.g. re-zeroing pruned weights after each step).
        train: False stops after the block-wise fit (an untrained baseline).
        clear_out_dir: remove ``out_dir`` right before training (``--overwrite``; rank 0 only).

    Returns:
        ``(TrainResult or None, report)``; the report holds ``blockwise``, ``train`` and ``teacher_cache``.
    """
    from lmslim.train.data import tokenize
    from lmslim.train.distributed import barrier

    task = distill_config.task
    if task not in ("clm", "embed"):
        raise UserError(f"distillation runs on task clm or embed, got {task!r} (use the Python API for "
                        "classification heads)")
    if getattr(teacher.config, "lmslim_quantization", None):
        raise UserError("the teacher is quantized; distil from the full-precision model")
    if getattr(student.config, "lmslim_quantization", None):
        raise UserError("the student is quantized; distil into a full-precision student, then quantize it")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    report: dict[str, Any] = {}
    if blockwise is not None and blockwise.epochs > 0 and not resume:
        from lmslim.compress.distill.blockwise import fit_on_data

        if task != "clm":
            raise UserError("blockwise distillation fits decoder blocks on text (task clm)")
        report["blockwise"] = fit_on_data(teacher, student, train_raw, tokenizer, blockwise, runtime,
                                          train_config.batch.max_length)
    if not train:
        report["train"] = None
        return None, report
    length, pack = train_config.batch.max_length, train_config.batch.pack
    if task == "clm":
        ts = tokenize(train_raw, tokenizer, "clm", length, pack)
        vs = tokenize(eval_raw, tokenizer, "clm", length, pack) if eval_raw else None
        evaluator = None
    else:
        ts = embed_set(train_raw, tokenizer, length)
        vs = embed_set(eval_raw, tokenizer, length) if eval_raw else None
        evaluator = embedding_evaluator(teacher, vs, runtime) if vs is not None else None
    cache = None
    if teacher_cache is not None:
        from lmslim.compress.distill.cache import TopKCache, teacher_fingerprint

        if task != "clm" or distill_config.hidden_weight > 0 or distill_config.attention_weight > 0:
            raise UserError("teacher_cache holds top-k logits only (task clm); drop it or the hidden-state / "
                            "attention losses")
        cache = TopKCache(Path(teacher_cache), top_k, teacher_hash or teacher_fingerprint(teacher))
    if clear_out_dir and out_dir is not None and Path(out_dir).exists() and runtime.is_main:
        shutil.rmtree(out_dir)  # under torchrun rank 0 clears it, the others wait
    barrier(runtime)
    result = distill(teacher, student, ts, distill_config, train_config, runtime, eval_data=vs, out_dir=out_dir,
                     resume=resume, resume_changes=resume_changes, evaluator=evaluator, cache=cache,
                     callbacks=list(callbacks))
    report["train"] = {"steps": result.steps, "final_loss": result.final_loss, "tokens_seen": result.tokens_seen,
                       "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s, "eval": result.eval,
                       "best_metric": result.best_metric, "best_step": result.best_step,
                       "stopped_early": result.stopped_early, "config": train_config.to_dict()}
    if cache is not None:
        report["teacher_cache"] = {"folder": str(teacher_cache), "top_k": top_k, "hits": cache.hits,
                                   "misses": cache.misses}
    return result, report


def describe_models(teacher_lm: Any, student: Any, info: dict) -> dict[str, Any]:
    """The ``teacher`` / ``student`` entries of a distillation summary."""
    from lmslim.nn.blocks import transformer_blocks

    return {"teacher": {"spec": teacher_lm.resolved.spec, "weights_sha256": teacher_lm.resolved.weights_hash(),
                        "layers": len(transformer_blocks(teacher_lm.model)[1]),
                        "params": unique_params(teacher_lm.model)},
            "student": {**info, "layers": len(transformer_blocks(student)[1]), "params": unique_params(student)}}


def run_distill(*, teacher: str, data: str, out_dir: Path, distill_config: DistillConfig, train_config: Any,
                student: str | None = None, student_layers: str | None = None, student_config: Path | None = None,
                anchor: str = "first", eval_data: str | None = None, untrained: bool = False,
                resume: bool = False, overwrite: bool = False, device: str = "auto", threads: int | None = None,
                trust_remote_code: bool = False, teacher_cache: Path | None = None, top_k: int = 64,
                blockwise: Any = None, resume_changes: Sequence[str] = ()) -> dict[str, Any]:
    """Distil ``teacher`` into a student and save it (with ``lmslim_distill.json``) in ``out_dir`` (Python API).

    ``lmslim distill`` runs the recipe stage ``distill`` instead; both end in :func:`distill_student`.

    Args:
        untrained: save the initialised student without training (a baseline).
        resume_changes: with ``resume``, training-config keys or sections (``optim.lr``, ``schedule``) allowed
            to differ from the checkpoint's; the new values apply (see :func:`lmslim.train.loop.train`).
        Other arguments as :func:`distill_student` and ``lmslim distill``'s options.

    Returns:
        The summary written to ``out_dir/lmslim_distill.json``.
    """
    from lmslim.core.runtime import Runtime
    from lmslim.data.spec import load_data
    from lmslim.modelio import load_model
    from lmslim.train.checkpoint import check_resume_changes

    if check_resume_changes(resume_changes) and not resume:  # before the teacher is loaded
        raise UserError("--resume-changes only applies with --resume (it names what may differ from the checkpoint)")
    task = distill_config.task
    t0 = time.perf_counter()
    rt = Runtime.create(device=device, threads=threads)
    train_raw = load_data(data, task=task)
    eval_raw = load_data(eval_data, task=task) if eval_data else None
    t = load_model(teacher, task="clm" if task == "clm" else "embed", dtype=torch.float32, device=rt.device,
                   trust_remote_code=trust_remote_code)
    s_model, s_tok, info = build_student(t, student=student, student_layers=student_layers,
                                         student_config=student_config, anchor=anchor, task=task, device=rt.device,
                                         trust_remote_code=trust_remote_code)
    check_same_vocabulary(t.model, t.tokenizer, s_model, s_tok)
    summary: dict[str, Any] = {**describe_models(t, s_model, info), "distill": distill_config.to_dict(),
                               "data": data, "eval_data": eval_data}
    _, report = distill_student(t.model, s_model, s_tok, train_raw=train_raw, eval_raw=eval_raw,
                                distill_config=distill_config, train_config=train_config, runtime=rt,
                                out_dir=out_dir, blockwise=blockwise, teacher_cache=teacher_cache, top_k=top_k,
                                teacher_hash=t.resolved.weights_hash(), resume=resume,
                                resume_changes=resume_changes, train=not untrained, clear_out_dir=overwrite)
    summary.update(report)
    summary["seconds"] = time.perf_counter() - t0
    return publish_summary(out_dir, summary, s_model, s_tok, untrained=untrained)


def publish_summary(out_dir: Path, summary: dict, model: Any, tokenizer: Any, *, untrained: bool) -> dict:
    """Write ``lmslim_distill.json`` into ``out_dir``; an untrained student (no training run saved it)
    is published together with it, atomically."""
    from lmslim.core.io import atomic_dir, atomic_write_json
    from lmslim.modelio import save_model

    if untrained:
        with atomic_dir(out_dir) as tmp:
            save_model(model, tokenizer, tmp)
            atomic_write_json(tmp / "lmslim_distill.json", summary)
    else:
        atomic_write_json(out_dir / "lmslim_distill.json", summary)
    return summary
