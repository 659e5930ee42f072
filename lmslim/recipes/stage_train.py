"""Recipe stages that train: ``finetune`` (the task loss) and ``distill`` (KD from a teacher).

Both take the training engine's config (``lmslim.train.config.TrainConfig``) under ``train``::

    - finetune: {train: {max_steps: 200, optim: {lr: 1e-4}, batch: {batch_size: 8, max_length: 256}}}
    - distill: {teacher: input, alpha: 0.5, temperature: 2.0, hidden_weight: 1.0,
                train: {max_steps: 200}}
    - distill: {student_layers: 2, anchor: spread, teacher_cache: runs/kd-cache, train: {max_steps: 200}}

``lmslim distill`` is this stage run alone (its flags are these keys); with ``eval.task: embed`` the
student learns the teacher's pooled sentence embeddings.

Recovery after unstructured pruning keeps the zeros: with ``keep_sparsity`` (default on) every
weight that is exactly zero when the stage starts is set back to zero after each optimizer step, so
the fine-tuned model has the same sparsity pattern (masked fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lmslim.core.configs import MAX_INT, check_value, did_you_mean, show
from lmslim.core.errors import UserError
from lmslim.recipes.stages import StageContext, StageKind, build_config, config_reference, register_stage


@dataclass(frozen=True)
class TrainStage:
    train: Any  # TrainConfig
    keep_sparsity: bool = True
    distill: Any = None  # DistillConfig for the distill stage
    teacher: str = "input"
    student_layers: Any = None  # distill: cut the student to these layers first (K = keep one in K, or a list)
    anchor: str = "first"  # distill: which layers K keeps (first, last, spread)
    student_config: str | None = None  # distill: a fresh student from this config file (overrides of the model's)
    blockwise: Any = None  # distill: BlockwiseConfig, fit the cut student's blocks before KD
    teacher_cache: str | None = None  # distill: folder caching the teacher's top-k logits
    top_k: int = 64
    untrained: bool = False  # distill: keep the cut/fitted student without KD training


ANCHORS = ("first", "last", "spread")


def _train_config(options: dict, where: str):
    from lmslim.train.config import TrainConfig

    train = options.get("train")
    train = {} if train is None else train
    if not isinstance(train, dict):
        raise UserError(f"{where}: train must be a mapping of training-config keys, got {show(train)}")
    try:
        return TrainConfig.from_dict(train)
    except UserError as e:
        raise UserError(f"{where}: train: {e}") from e


def _option(options: dict, key: str, t: Any, default: Any, where: str) -> Any:
    try:
        return check_value(options.get(key, default), t, key)
    except UserError as e:
        raise UserError(f"{where}: {e}") from e


def _student_layers(value: Any, where: str) -> int | list[int] | None:
    """K (keep one layer in K) or the kept layers (a list, or a string like "0,2,4"); the range is checked
    at run time, when the teacher's depth is known."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]").split(",")]
        if all(p.isascii() and p.isdigit() and len(p) < 10 for p in parts):
            value = [int(p) for p in parts] if "," in value else int(parts[0])
    if _is_count(value) and value >= 1:
        return value
    if isinstance(value, (list, tuple)) and value and all(_is_count(i) for i in value):
        return list(value)
    raise UserError(f"{where}: student_layers must be K >= 1 (keep one layer in K) or a list of layer indices "
                    f">= 0 like [0, 2, 4], got {show(value)}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


def _parse_finetune(options: dict) -> TrainStage:
    where = "stage finetune"
    allowed = {"train", "keep_sparsity"}
    for key in options:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {show(key)}{did_you_mean(key, allowed)}")
    return TrainStage(train=_train_config(options, where),
                      keep_sparsity=_option(options, "keep_sparsity", bool, True, where))


def _parse_distill(options: dict) -> TrainStage:
    from lmslim.compress.distill import DistillConfig
    from lmslim.compress.distill.blockwise import BlockwiseConfig

    where = "stage distill"
    extra = {"train", "keep_sparsity", "teacher", "student_layers", "anchor", "student_config", "blockwise",
             "teacher_cache", "top_k", "untrained"}
    if not isinstance(options, dict):
        raise UserError(f"{where}: options must be a mapping of distillation keys, got {show(options)}")
    cfg = build_config(DistillConfig, {k: v for k, v in options.items() if k != "task"}, where, extra)
    student_layers = _student_layers(options.get("student_layers"), where)
    student_config = _option(options, "student_config", Optional[str], None, where)
    if student_layers is not None and student_config is not None:
        raise UserError(f"{where}: give student_layers or student_config, not both")
    anchor = _option(options, "anchor", str, "first", where)
    if anchor not in ANCHORS:
        raise UserError(f"{where}: anchor must be one of {', '.join(ANCHORS)}, got {show(anchor)}")
    if "anchor" in options and not _is_count(student_layers):
        raise UserError(f"{where}: anchor applies to student_layers K (keep one layer in K)")
    blockwise = None
    if options.get("blockwise") is not None:
        if not isinstance(options["blockwise"], dict):
            raise UserError(f"{where}: blockwise must be a mapping of BlockwiseConfig keys (e.g. {{epochs: 4}})")
        blockwise = build_config(BlockwiseConfig, options["blockwise"], f"{where}: blockwise", set())
        if student_layers is None:
            raise UserError(f"{where}: blockwise needs student_layers (it fits the blocks of a student cut from "
                            "the teacher)")
    teacher = _option(options, "teacher", str, "input", where)
    if not teacher.strip():
        raise UserError(f"{where}: teacher must be 'input' (the recipe's model) or a model spec, got ''")
    teacher_cache = _option(options, "teacher_cache", Optional[str], None, where)
    top_k = _option(options, "top_k", int, 64, where)
    if top_k < 1:
        raise UserError(f"{where}: top_k must be >= 1, got {top_k}")
    if teacher_cache is not None and (cfg.hidden_weight > 0 or cfg.attention_weight > 0):
        raise UserError(f"{where}: teacher_cache holds top-k logits only; drop it or the hidden-state / attention "
                        "losses")
    return TrainStage(train=_train_config(options, where),
                      keep_sparsity=_option(options, "keep_sparsity", bool, True, where), distill=cfg,
                      teacher=teacher, student_layers=student_layers, anchor=anchor, student_config=student_config,
                      blockwise=blockwise, teacher_cache=teacher_cache, top_k=top_k,
                      untrained=_option(options, "untrained", bool, False, where))


def sparsity_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the 2-D weights that are at least 5% exact zeros (pruned matrices)."""
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name:
            keep = p.detach() != 0
            if (~keep).float().mean() >= 0.05:
                masks[name] = keep
    return masks


def _mask_callback(model: torch.nn.Module, masks: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())

    @torch.no_grad()
    def reapply(_step: int, _record: dict) -> None:
        for name, keep in masks.items():
            params[name].mul_(keep)
    return reapply


def _run_training(lm, stage: TrainStage, ctx: StageContext, task: str):
    from safetensors.torch import load_file

    from lmslim.data.spec import load_data
    from lmslim.train.data import tokenize
    from lmslim.train.loop import train

    cfg = stage.train
    data = load_data(ctx.recipe.data.train, task=task)
    train_set = tokenize(data, lm.tokenizer, task, max_length=cfg.batch.max_length, pack=cfg.batch.pack)
    eval_set = None
    if ctx.recipe.data.validation:
        eval_set = tokenize(load_data(ctx.recipe.data.validation, task=task), lm.tokenizer, task,
                            max_length=cfg.batch.max_length, pack=cfg.batch.pack, label_names=train_set.label_names)
    model = lm.model
    if lm.tokenizer.pad_token_id is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    masks = sparsity_masks(model) if stage.keep_sparsity else {}
    callbacks = [_mask_callback(model, masks)] if masks else []
    result = train(model, train_set, cfg, ctx.runtime, eval_data=eval_set, out_dir=ctx.work_dir,
                   callbacks=callbacks)
    if result.best_step is not None and result.best_step != result.steps:
        # The loop saved the best evaluated weights; hand those on, not the last step's.
        state = load_file(str(ctx.work_dir / "model.safetensors"))
        model.load_state_dict(state, strict=False)
    model.eval()
    report = {"steps": result.steps, "final_loss": result.final_loss, "tokens_seen": result.tokens_seen,
              "train_tokens_per_s": result.tokens_per_s, "train_seconds": result.elapsed_s,
              "best_step": result.best_step, "best_metric": result.best_metric,
              "stopped_early": result.stopped_early, "kept_sparse_matrices": len(masks)}
    return model, lm.tokenizer, report


def _run_finetune(lm, stage: TrainStage, ctx: StageContext):
    return _run_training(lm, stage, ctx, ctx.recipe.eval.task)


def _run_distill(lm, stage: TrainStage, ctx: StageContext):
    """Student from the current model (cut, fresh from a config, or itself), then ``distill_student``."""
    import dataclasses

    from lmslim.compress.distill.run import describe_models, distill_student
    from lmslim.compress.distill.student import check_same_vocabulary
    from lmslim.data.spec import load_data
    from lmslim.modelio import load_model

    task = ctx.recipe.eval.task
    device = ctx.runtime.device
    spec = ctx.input_spec if stage.teacher == "input" else stage.teacher
    student, info = _student(lm, stage, device)
    fp32 = all(p.dtype == torch.float32 for p in lm.model.parameters())
    if student is not lm.model and fp32 and spec == lm.resolved.spec:
        teacher = lm  # the student is a new model; the loaded one is the teacher (loaded once, never trained)
    else:
        teacher = load_model(spec, task="clm" if task == "clm" else "embed", dtype=torch.float32, device=device,
                             trust_remote_code=ctx.trust_remote_code)
    check_same_vocabulary(teacher.model, teacher.tokenizer, student, lm.tokenizer)
    masks = sparsity_masks(student) if stage.keep_sparsity else {}
    train_raw = load_data(ctx.recipe.data.train, task=task)
    eval_raw = load_data(ctx.recipe.data.validation, task=task) if ctx.recipe.data.validation else None
    config = dataclasses.replace(stage.distill, task=task)
    report = {**describe_models(teacher, student, info), "distill": config.to_dict()}
    result, run_report = distill_student(
        teacher.model, student, lm.tokenizer, train_raw=train_raw, eval_raw=eval_raw, distill_config=config,
        train_config=stage.train, runtime=ctx.runtime, out_dir=ctx.work_dir, blockwise=stage.blockwise,
        teacher_cache=stage.teacher_cache, top_k=stage.top_k, teacher_hash=teacher.resolved.weights_hash(),
        resume=ctx.resume, resume_changes=ctx.resume_changes, train=not stage.untrained,
        callbacks=[_mask_callback(student, masks)] if masks else [], clear_out_dir=ctx.clear_work_dir)
    report.update(run_report, kept_sparse_matrices=len(masks))
    if result is not None and result.best_step is not None and result.best_step != result.steps:
        # The loop published the best evaluated weights as the final model; hand those on, not the last step's.
        student = load_model(str(ctx.work_dir), task="clm" if task == "clm" else "embed", dtype=torch.float32,
                             device=device).model
    student.eval()
    return student, lm.tokenizer, report


def _student(lm, stage: TrainStage, device) -> tuple[Any, dict]:
    from pathlib import Path

    from lmslim.compress.distill.student import (check_layers, parse_layers, read_config_file, student_from_config,
                                                 student_from_layers)
    from lmslim.nn.blocks import transformer_blocks

    if stage.student_layers is not None:
        n = len(transformer_blocks(lm.model)[1])
        # A list names the kept layers (even a one-item list); a number K keeps one layer in K.
        layers = check_layers(stage.student_layers, n) if isinstance(stage.student_layers, list) else \
            parse_layers(str(stage.student_layers), n, stage.anchor)
        return student_from_layers(lm.model, layers), {"source": "teacher-layers", "kept": layers,
                                                      "anchor": stage.anchor}
    if stage.student_config is not None:
        fields = read_config_file(Path(stage.student_config))
        return student_from_config(lm.model, fields).to(device), {"source": "config", "file": stage.student_config}
    return lm.model, {"source": "model", "spec": lm.resolved.spec, "weights_sha256": lm.resolved.weights_hash()}


_TRAIN_KEYS = [("train", "mapping", "training config: every key of `lmslim train --config` (see docs/train.md)"),
               ("keep_sparsity", "bool", "True (re-zero pruned weights after every step)")]


def _distill_reference():
    import dataclasses

    from lmslim.compress.distill import DistillConfig
    from lmslim.compress.distill.blockwise import BlockwiseConfig

    rows = [r for r in config_reference(DistillConfig) if r[0] != "task"]
    rows += [("teacher", "str", "'input' (the recipe's model) or a model spec"),
             ("student_layers", "int | list", "None (cut the student from the current model: K keeps one layer "
              "in K, or a list of layers; else the current model is the student)"),
             ("anchor", "str", "'first' (with student_layers K: first keeps 0, K, 2K…; last keeps the last and "
              "every K-th before it; spread keeps first and last, the rest evenly spaced)"),
             ("student_config", "str", "None (a JSON/YAML file: a fresh student from the current model's config "
              "with these overrides, or a full config with model_type)"),
             ("teacher_cache", "str", "None (folder caching the teacher's top-k logits; later runs on the same "
              "text skip the teacher; clm logit KD only)"),
             ("top_k", "int", "64 (logits per position kept in teacher_cache)"),
             ("untrained", "bool", "False (true: keep the cut / block-fitted student without KD training)")]
    rows += [(f"blockwise.{f.name}", str(f.type).replace("typing.", ""), repr(f.default))
             for f in dataclasses.fields(BlockwiseConfig)]
    return [("", rows + _TRAIN_KEYS)]


register_stage(StageKind(
    name="finetune", summary="train the current model on data.train with its task loss (recovery after "
    "pruning); data.validation enables early stopping and best-checkpoint selection",
    parse=_parse_finetune, run=_run_finetune, needs=lambda s: ("train",), trains=True,
    reference=lambda: [("", _TRAIN_KEYS)]))
register_stage(StageKind(
    name="distill", summary="train the current model (the student) to match a frozen teacher (default: the "
    "recipe's input model) with logit KD and optional hidden-state/attention losses",
    parse=_parse_distill, run=_run_distill, needs=lambda s: ("train",), trains=True, reference=_distill_reference))
# ``blockwise.*`` rows: giving the ``blockwise`` mapping (any of its keys) turns the fit on; it needs student_layers.


# ------------------------------------------------------------------------------------------------- share
# Sharing changes the weights without training; it lives here because recovery (distill/finetune)
# is what makes it useful, and both read the same saved format.

def _parse_share(options: dict):
    from lmslim.compress.share import ShareConfig

    return build_config(ShareConfig, options, "stage share")


def _run_share(lm, config, ctx: StageContext):
    from lmslim.compress.share import share_

    return lm.model, lm.tokenizer, share_(lm.model, config)


def _share_reference():
    from lmslim.compress.share import ShareConfig

    return [("", config_reference(ShareConfig))]


register_stage(StageKind(
    name="share", summary="ALBERT-style cross-layer sharing: one set of block weights per group of consecutive "
    "layers (fewer stored parameters; FLOPs unchanged); follow it with distill to recover",
    parse=_parse_share, run=_run_share, trains=True, reference=_share_reference))
