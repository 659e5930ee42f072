"""Recipe stages that train: ``finetune`` (the task loss) and ``distill`` (KD from a teacher).

Both take the training engine's config (``lmslim.train.config.TrainConfig``) under ``train``::

    - finetune: {train: {max_steps: 200, optim: {lr: 1e-4}, batch: {batch_size: 8, max_length: 256}}}
    - distill: {teacher: input, alpha: 0.5, temperature: 2.0, hidden_weight: 1.0,
                train: {max_steps: 200}}

Recovery after unstructured pruning keeps the zeros: with ``keep_sparsity`` (default on) every
weight that is exactly zero when the stage starts is set back to zero after each optimizer step, so
the fine-tuned model has the same sparsity pattern (masked fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    blockwise: Any = None  # distill: BlockwiseConfig, fit the cut student's blocks before KD


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
    extra = {"train", "keep_sparsity", "teacher", "student_layers", "blockwise"}
    cfg = build_config(DistillConfig, {k: v for k, v in options.items() if k != "task"}, where, extra)
    blockwise = None
    if options.get("blockwise") is not None:
        if not isinstance(options["blockwise"], dict):
            raise UserError(f"{where}: blockwise must be a mapping of BlockwiseConfig keys (e.g. {{epochs: 4}})")
        blockwise = build_config(BlockwiseConfig, options["blockwise"], f"{where}: blockwise", set())
        if options.get("student_layers") is None:
            raise UserError(f"{where}: blockwise needs student_layers (it fits the blocks of a student cut from "
                            "the teacher)")
    teacher = _option(options, "teacher", str, "input", where)
    if not teacher.strip():
        raise UserError(f"{where}: teacher must be 'input' (the recipe's model) or a model spec, got ''")
    return TrainStage(train=_train_config(options, where),
                      keep_sparsity=_option(options, "keep_sparsity", bool, True, where), distill=cfg,
                      teacher=teacher, student_layers=_student_layers(options.get("student_layers"), where),
                      blockwise=blockwise)


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


def _run_training(lm, stage: TrainStage, ctx: StageContext, task: str, teacher=None):
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
    objective = None
    if stage.distill is not None:
        from lmslim.compress.distill.objective import DistillObjective

        objective = DistillObjective(teacher, model, stage.distill)
    result = train(model, train_set, cfg, ctx.runtime, eval_data=eval_set, objective=objective,
                   out_dir=ctx.work_dir, callbacks=callbacks)
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
    import dataclasses

    from lmslim.compress.distill.student import check_layers, check_same_vocabulary, parse_layers, \
        student_from_layers
    from lmslim.nn.blocks import transformer_blocks
    from lmslim.modelio import load_model

    task = ctx.recipe.eval.task
    spec = ctx.input_spec if stage.teacher == "input" else stage.teacher
    teacher = load_model(spec, task=task, dtype=torch.float32, device=ctx.runtime.device)
    check_same_vocabulary(teacher.model, teacher.tokenizer, lm.model, lm.tokenizer)
    if stage.student_layers is not None:
        n = len(transformer_blocks(lm.model)[1])
        # A list names the kept layers (even a one-item list); a number K keeps one layer in K.
        layers = check_layers(stage.student_layers, n) if isinstance(stage.student_layers, list) else \
            parse_layers(str(stage.student_layers), n)
        lm.model = student_from_layers(lm.model, layers)
    blockwise_report = None
    if stage.blockwise is not None and stage.blockwise.epochs > 0:
        from lmslim.compress.distill.blockwise import fit_on_data
        from lmslim.data.spec import load_data

        if task != "clm":
            raise UserError("stage distill: blockwise fits decoder blocks on text; it needs eval.task clm")
        blockwise_report = fit_on_data(teacher.model, lm.model, load_data(ctx.recipe.data.train, task="clm"),
                                       lm.tokenizer, stage.blockwise, ctx.runtime, stage.train.batch.max_length)
    config = dataclasses.replace(stage.distill, task=task)
    model, tok, report = _run_training(lm, dataclasses.replace(stage, distill=config), ctx, task,
                                       teacher=teacher.model)
    if blockwise_report is not None:
        report["blockwise"] = blockwise_report
    return model, tok, report


_TRAIN_KEYS = [("train", "mapping", "training config: every key of `lmslim train --config` (see docs/train.md)"),
               ("keep_sparsity", "bool", "True (re-zero pruned weights after every step)")]


def _blockwise_defaults() -> dict:
    import dataclasses

    from lmslim.compress.distill.blockwise import BlockwiseConfig

    return {f.name: f.default for f in dataclasses.fields(BlockwiseConfig)}


def _distill_reference():
    from lmslim.compress.distill import DistillConfig

    rows = [r for r in config_reference(DistillConfig) if r[0] != "task"]
    return [("", rows + [("teacher", "str", "'input' (the recipe's model) or a model spec"),
                         ("student_layers", "int | list", "None (K: keep one layer in K; or a list of layers)"),
                         ("blockwise", "mapping", "None (needs student_layers; fit each cut block to the teacher "
                          "blocks it replaces before KD; keys: "
                          + ", ".join(f"{k}={v!r}" for k, v in _blockwise_defaults().items()) + ")")]
             + _TRAIN_KEYS)]


register_stage(StageKind(
    name="finetune", summary="train the current model on data.train with its task loss (recovery after "
    "pruning); data.validation enables early stopping and best-checkpoint selection",
    parse=_parse_finetune, run=_run_finetune, needs=lambda s: ("train",), trains=True,
    reference=lambda: [("", _TRAIN_KEYS)]))
register_stage(StageKind(
    name="distill", summary="train the current model (the student) to match a frozen teacher (default: the "
    "recipe's input model) with logit KD and optional hidden-state/attention losses",
    parse=_parse_distill, run=_run_distill, needs=lambda s: ("train",), trains=True, reference=_distill_reference))


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
