"""One distillation run from specs: load the teacher, build the student, train, save, summarise.

This is what ``lmslim distill`` calls; from Python the pieces (``student_from_layers``,
``DistillObjective``, ``lmslim.train.loop.train``) can be used directly instead.

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


def run_distill(*, teacher: str, data: str, out_dir: Path, distill_config: DistillConfig, train_config: Any,
                student: str | None = None, student_layers: str | None = None, student_config: Path | None = None,
                anchor: str = "first", eval_data: str | None = None, untrained: bool = False,
                resume: bool = False, overwrite: bool = False, device: str = "auto", threads: int | None = None,
                trust_remote_code: bool = False, teacher_cache: Path | None = None, top_k: int = 64,
                blockwise: Any = None, resume_changes: Sequence[str] = ()) -> dict[str, Any]:
    """Distil ``teacher`` into a student and save it (with ``lmslim_distill.json``) in ``out_dir``.

    Args:
        untrained: save the initialised student without training (``--max-steps 0``: a baseline).
        teacher_cache, top_k: cache the teacher's top-k logits in this folder and reuse them (clm, logit KD only).
        blockwise: a :class:`~lmslim.compress.distill.blockwise.BlockwiseConfig`: before KD, re-fit each
            block of a student cut from the teacher's layers to the teacher blocks it replaces (clm; skipped
            on ``resume``, whose checkpoint already holds the fitted blocks).
        resume_changes: with ``resume``, training-config keys or sections (``optim.lr``, ``schedule``) allowed
            to differ from the checkpoint's; the new values apply (see :func:`lmslim.train.loop.train`).
        Other arguments mirror ``lmslim distill``'s options.

    Returns:
        The summary written to ``out_dir/lmslim_distill.json``.
    """
    from lmslim.compress.calibration import transformer_blocks
    from lmslim.core.io import atomic_dir, atomic_write_json
    from lmslim.modelio import load_model
    from lmslim.core.runtime import Runtime
    from lmslim.data.spec import load_data
    from lmslim.train.data import tokenize

    from lmslim.train.checkpoint import check_resume_changes

    if check_resume_changes(resume_changes) and not resume:  # before the teacher is loaded
        raise UserError("--resume-changes only applies with --resume (it names what may differ from the checkpoint)")
    task = distill_config.task
    if task not in ("clm", "embed"):
        raise UserError(f"lmslim distill supports --task clm or embed, got {task!r} (use the Python API for "
                        "classification heads)")
    t0 = time.perf_counter()
    rt = Runtime.create(device=device, threads=threads)
    train_raw = load_data(data, task=task)
    eval_raw = load_data(eval_data, task=task) if eval_data else None
    model_task = "clm" if task == "clm" else "embed"
    t = load_model(teacher, task=model_task, dtype=torch.float32, device=rt.device,
                   trust_remote_code=trust_remote_code)
    if getattr(t.model.config, "lmslim_quantization", None):
        raise UserError("the teacher is quantized; distil from the full-precision model")
    s_model, s_tok, info = build_student(t, student=student, student_layers=student_layers,
                                         student_config=student_config, anchor=anchor, task=task, device=rt.device,
                                         trust_remote_code=trust_remote_code)
    check_same_vocabulary(t.model, t.tokenizer, s_model, s_tok)
    if getattr(s_model.config, "lmslim_quantization", None):
        raise UserError("the student is quantized; distil into a full-precision student, then quantize it")
    if s_tok.pad_token_id is None and s_tok.eos_token_id is not None:
        s_tok.pad_token = s_tok.eos_token
    summary: dict[str, Any] = {
        "teacher": {"spec": teacher, "weights_sha256": t.resolved.weights_hash(),
                    "layers": len(transformer_blocks(t.model)[1]), "params": unique_params(t.model)},
        "student": {**info, "layers": len(transformer_blocks(s_model)[1]), "params": unique_params(s_model)},
        "distill": distill_config.to_dict(), "data": data, "eval_data": eval_data,
    }
    use_blockwise = blockwise is not None and blockwise.epochs > 0 and not resume
    if use_blockwise:
        from lmslim.compress.distill.blockwise import fit_on_data

        if task != "clm":
            raise UserError("blockwise distillation fits decoder blocks on text (task clm); drop --blockwise-epochs")
        summary["blockwise"] = fit_on_data(t.model, s_model, train_raw, s_tok, blockwise, rt,
                                           train_config.batch.max_length)
    if untrained:
        summary["train"] = None
        with atomic_dir(out_dir) as tmp:
            s_model.save_pretrained(tmp, safe_serialization=True)
            s_tok.save_pretrained(tmp)
            summary["seconds"] = time.perf_counter() - t0
            atomic_write_json(tmp / "lmslim_distill.json", summary)
        return summary

    if task == "clm":
        ts = tokenize(train_raw, s_tok, "clm", train_config.batch.max_length, train_config.batch.pack)
        vs = tokenize(eval_raw, s_tok, "clm", train_config.batch.max_length, train_config.batch.pack) \
            if eval_raw else None
        evaluator = None
    else:
        ts = embed_set(train_raw, s_tok, train_config.batch.max_length)
        vs = embed_set(eval_raw, s_tok, train_config.batch.max_length) if eval_raw else None
        evaluator = embedding_evaluator(t.model, vs, rt) if vs is not None else None
    cache = None
    if teacher_cache is not None:
        from lmslim.compress.distill.cache import TopKCache, teacher_fingerprint

        cache = TopKCache(teacher_cache, top_k, t.resolved.weights_hash() or teacher_fingerprint(t.model))
    if overwrite and out_dir.exists() and rt.is_main:  # under torchrun rank 0 clears it, the others wait
        shutil.rmtree(out_dir)
    from lmslim.train.distributed import barrier

    barrier(rt)
    result = distill(t.model, s_model, ts, distill_config, train_config, rt, eval_data=vs, out_dir=out_dir,
                     resume=resume, resume_changes=resume_changes, evaluator=evaluator, cache=cache)
    summary["train"] = {"steps": result.steps, "final_loss": result.final_loss, "tokens_seen": result.tokens_seen,
                        "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s, "eval": result.eval,
                        "best_metric": result.best_metric, "best_step": result.best_step,
                        "stopped_early": result.stopped_early, "config": train_config.to_dict()}
    if cache is not None:
        summary["teacher_cache"] = {"folder": str(teacher_cache), "top_k": top_k, "hits": cache.hits,
                                    "misses": cache.misses}
    summary["seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "lmslim_distill.json", summary)
    return summary
