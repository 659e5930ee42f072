"""``lmslim distill`` (teacher → student) and ``lmslim share`` (ALBERT cross-layer sharing), each a one-stage recipe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import DeviceOpt, ThreadsOpt, TrustOpt, app, hold, out, run_stage_command, stage_options
from lmslim.cli.launch import MasterAddrOpt, MasterPortOpt, NnodesOpt, NodeRankOpt, NprocOpt
from lmslim.core.errors import UserError


# Flags of `lmslim share` that are not share-stage keys, and where a recipe says the same thing.
SHARE_OUTSIDE_STAGE = {"model": "model", "task": "eval.task", "out_dir": "compress --out",
                       "overwrite": "compress --overwrite", "threads": "compress --threads",
                       "trust_remote_code": "(not in recipes: off)"}


@app.command()
def share(
    model: str = typer.Argument(..., help="Model spec (full precision, not already shared)."),
    group_size: int = typer.Option(..., "--group-size", help="Consecutive layers that share one set of weights (>= 2)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    init: Optional[str] = typer.Option(None, "--init", help="mean (default) | first | index: initial shared "
                                       "weights of each group."),
    index: Optional[int] = typer.Option(None, "--index", help="With --init index: which layer of each group "
                                        "(0-based)."),
    keep_norms: Optional[bool] = typer.Option(None, "--keep-norms/--share-norms", help="Keep per-layer norm "
                                              "weights (default) or share them too."),
    task: str = typer.Option("auto", "--task", help="auto (from the architecture), clm or embed."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
) -> None:
    """Share block weights across groups of consecutive layers (ALBERT); fewer parameters, same FLOPs.

    Each flag is the share recipe stage's key of the same name (a one-stage recipe, run as `lmslim
    compress` runs it). Quality drops until the shared model is re-trained: recover it with
    ``lmslim distill --teacher MODEL --student OUT ...``.
    """
    options = stage_options(locals(), SHARE_OUTSIDE_STAGE)  # first: locals() are the flags only
    from lmslim.modelio import resolve

    if task not in ("auto", "clm", "embed"):
        raise UserError(f"share --task must be auto, clm or embed, got {task!r}")
    if task == "auto":
        from lmslim.cli.main import _causal_or_embed

        task = _causal_or_embed(resolve(model))
    report = run_stage_command("share", options, model, out_dir, task=task, overwrite=overwrite, threads=threads,
                               trust_remote_code=trust_remote_code)
    out.print(f"share: {len(report['groups'])} groups of <= {group_size} layers; parameters "
              f"{report['params_before'] / 1e6:.2f} M -> {report['params_after'] / 1e6:.2f} M (unique); "
              f"{report['size_mb_before']:.1f} MB -> {report['size_mb_after']:.1f} MB on disk. FLOPs per token are "
              "unchanged (every layer still runs); quality needs recovery (lmslim distill).", soft_wrap=True)
    out.print(f"wrote {out_dir}")


# Flags of `lmslim distill` that are not distill-stage keys, and where a recipe says the same thing.
DISTILL_OUTSIDE_STAGE = {
    "ctx": "(the command line, for --nproc)", "overrides": "train.*", "student": "model", "data": "data.train",
    "eval_data": "data.validation", "task": "eval.task", "config": "train", "max_steps": "train.max_steps",
    "batch_size": "train.batch.batch_size", "lr": "train.optim.lr", "precision": "train.precision.mode",
    "out_dir": "compress --out (here: the training folder)", "resume": "(resuming: compress re-runs skip done stages)",
    "resume_changes": "(resuming)", "overwrite": "compress --overwrite", "threads": "compress --threads",
    "device": "(compress runs on cpu)", "trust_remote_code": "(not in recipes: off)", "nproc": "(launch)",
    "nnodes": "(launch)", "node_rank": "(launch)", "master_addr": "(launch)", "master_port": "(launch)"}


@app.command()
def distill(
    ctx: typer.Context,
    overrides: Optional[list[str]] = typer.Argument(None, help="Training config overrides key=value "
                                                    "(e.g. optim.lr=1e-4 batch.grad_accum=2)."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model spec (frozen; never modified)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student model spec (e.g. a pruned or shared "
                                          "model); must use the teacher's tokenizer."),
    student_layers: Optional[str] = typer.Option(None, "--student-layers", help="Cut the student from the teacher: "
                                                 "K keeps one layer in K, or a list of teacher layers like 0,2,5."),
    student_config: Optional[Path] = typer.Option(None, "--student-config", help="JSON/YAML config for a fresh "
                                                  "student: a full config (with model_type) or overrides of the "
                                                  "teacher's config (e.g. num_hidden_layers: 6)."),
    anchor: Optional[str] = typer.Option(None, "--anchor", help="With --student-layers K: first (default; layers 0, "
                                         "K, 2K, ... as DistilBERT), last (the last layer and every K-th before it) "
                                         "or spread (first and last kept, the rest evenly spaced)."),
    data: str = typer.Option(..., "--data", help="Training text (clm) or sentences (embed)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: student, metrics.jsonl, checkpoints."),
    task: str = typer.Option("clm", "--task", help="clm (logit KD) or embed (pooled sentence embeddings)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the hard-label CE; 1-alpha weighs the "
                                          "soft KL (default 0.5)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Softmax temperature T > 0 (KL scaled "
                                                "by T^2; default 2)."),
    hidden_loss: Optional[str] = typer.Option(None, "--hidden-loss", help="mse (default) | cosine between hidden "
                                              "states."),
    hidden_weight: Optional[float] = typer.Option(None, "--hidden-weight", help="Weight of the hidden-state loss "
                                                  "(default 0 = off)."),
    layer_map: Optional[str] = typer.Option(None, "--layer-map", help="uniform (default) | last | kept | pairs "
                                            "like 1:2,2:4."),
    attention_weight: Optional[float] = typer.Option(None, "--attention-weight", help="Weight of the attention-map "
                                                     "KL (default 0 = off; needs equal head counts; eager attention)."),
    embed_loss: Optional[str] = typer.Option(None, "--embed-loss", help="embed: cosine (default) | mse on pooled "
                                             "embeddings."),
    projection: Optional[bool] = typer.Option(None, "--projection/--no-projection", help="Learn a projection "
                                              "when student and teacher widths differ (default on)."),
    keep_sparsity: Optional[bool] = typer.Option(None, "--keep-sparsity/--no-keep-sparsity", help="Re-zero the "
                                                 "student's pruned weights after every step (default on)."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Folder caching the teacher's "
                                                 "top-k logits per row; later runs on the same text skip the teacher "
                                                 "(clm logit KD only; soft targets use the top-k)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Logits per position kept in --teacher-cache "
                                        "(default 64)."),
    untrained: Optional[bool] = typer.Option(None, "--untrained/--trained", help="Save the cut / block-fitted "
                                             "student without KD training (a baseline; also --max-steps 0)."),
    blockwise_epochs: Optional[int] = typer.Option(None, "--blockwise-epochs", help="Before KD, re-fit each block of "
                                                   "a student cut with --student-layers to the teacher blocks it "
                                                   "replaces, this many passes over the rows (default 4 once any "
                                                   "--blockwise-* flag is given; 0 = off; see docs/distill.md)."),
    blockwise_samples: Optional[int] = typer.Option(None, "--blockwise-samples", help="Rows (from --data) for the "
                                                    "block-wise fit (default 128)."),
    blockwise_seq_len: Optional[int] = typer.Option(None, "--blockwise-seq-len", help="Tokens per block-wise row "
                                                    "(default 256)."),
    blockwise_lr: Optional[float] = typer.Option(None, "--blockwise-lr", help="Learning rate of the block-wise fit "
                                                 "(default 1e-3)."),
    blockwise_batch_size: Optional[int] = typer.Option(None, "--blockwise-batch-size", help="Rows per block-wise "
                                                       "step (default 2)."),
    blockwise_grad_clip: Optional[float] = typer.Option(None, "--blockwise-grad-clip", help="Gradient-norm clip of "
                                                        "the block-wise fit (default 1)."),
    blockwise_seed: Optional[int] = typer.Option(None, "--blockwise-seed", help="Seed of the block-wise row order "
                                                 "(default 0)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training config YAML (see docs/train.md)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps; 0 saves the initialised "
                                            "student untrained (a baseline)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Shortcut for batch.batch_size=N."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Shortcut for optim.lr=X."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Shortcut for precision.mode (auto, fp32, "
                                            "bf16, fp16)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Validation data (evaluation, best "
                                            "checkpoint, early stopping)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    resume_changes: Optional[str] = typer.Option(None, "--resume-changes", help="With --resume: config keys or "
                                                 "sections allowed to differ from the checkpoint's run, e.g. "
                                                 "optim.lr,schedule (the new values apply)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a non-empty --out and start again."),
    threads: Optional[int] = ThreadsOpt, device: str = DeviceOpt, trust_remote_code: bool = TrustOpt,
    nproc: Optional[int] = NprocOpt, nnodes: int = NnodesOpt, node_rank: int = NodeRankOpt,
    master_addr: str = MasterAddrOpt, master_port: Optional[int] = MasterPortOpt,
) -> None:
    """Distil a teacher into a smaller student (logit KD, hidden states, attention maps, embeddings).

    The student is cut from the teacher (--student-layers), loaded (--student) or built fresh
    (--student-config); then trained with the training engine against the frozen teacher. Each flag is
    the distill recipe stage's key of the same name (--blockwise-epochs is blockwise.epochs; --config,
    the shortcuts and key=value items make its train mapping): the command runs that stage alone.
    """
    options = stage_options(locals(), DISTILL_OUTSIDE_STAGE)  # first: locals() are the flags only
    from lmslim.cli.train_cmd import check_out_dir, remove_unfinished_start
    from lmslim.recipes.single import single_stage_recipe
    from lmslim.train.checkpoint import check_resume_changes
    from lmslim.train.config import TrainConfig

    if sum(s is not None for s in (student, student_layers, student_config)) != 1:
        raise UserError("give exactly one of --student MODEL, --student-layers K and --student-config FILE")
    if task not in ("clm", "embed"):
        raise UserError(f"lmslim distill supports --task clm or embed, got {task!r} (use the Python API for "
                        "classification heads)")
    blockwise = {k.removeprefix("blockwise_"): options.pop(k) for k in list(options) if k.startswith("blockwise_")}
    if blockwise:
        options["blockwise"] = blockwise
    items = list(overrides or [])
    if max_steps is not None:
        if max_steps < 0:
            raise UserError(f"--max-steps must be >= 0, got {max_steps}")
        if max_steps > 0:
            items.append(f"max_steps={max_steps}")
        elif untrained is False:
            raise UserError("--max-steps 0 keeps the student untrained; drop --trained")
        else:
            options["untrained"] = True
    for key, value in (("batch.batch_size", batch_size), ("optim.lr", lr), ("precision.mode", precision)):
        if value is not None:
            items.append(f"{key}={value}")
    options["train"] = TrainConfig.from_yaml(config, items).to_dict()
    if student_config is not None:
        options["student_config"] = str(student_config)
    if teacher_cache is not None:
        options["teacher_cache"] = str(teacher_cache)
    model_spec = student if student is not None else teacher
    recipe, stage = single_stage_recipe("distill", options, model_spec, {"train": data, "validation": eval_data}, task)
    if stage.untrained and resume:
        raise UserError("--max-steps 0 (--untrained) saves the untrained student; there is nothing to --resume")
    if check_resume_changes(resume_changes or ()) and not resume:
        raise UserError("--resume-changes only applies with --resume (it names what may differ from the checkpoint)")
    inputs = [teacher, student, student_config, data, eval_data, config]
    stale, lock = check_out_dir(out_dir, resume, overwrite, inputs)
    hold(lock)
    if teacher_cache is not None:
        from lmslim.core.guard import check_no_overlap

        check_no_overlap(teacher_cache, [*inputs, out_dir], "--teacher-cache")
    if nproc is not None:
        if stage.untrained:
            raise UserError("--max-steps 0 (--untrained) only saves the initialised student; drop --nproc")
        from lmslim.cli.launch import launch

        # The plan is checked here, before any worker starts (degrees, the student's shape, what pp refuses).
        dims = _student_dims(teacher, student, student_layers, student_config, anchor)
        launch(ctx.obj["argv"], nproc, nnodes, node_rank, master_addr, master_port, threads,
               stage.train.distributed, student, train=stage.train, dims=dims, objective="distillation",
               evaluates=eval_data is not None)
        return
    with remove_unfinished_start(out_dir):
        summary = _run_distill_stage(recipe, stage, out_dir, resume=resume, resume_changes=resume_changes,
                                     clear=overwrite or stale, device=device, threads=threads,
                                     trust_remote_code=trust_remote_code)
    _print_summary(summary)
    out.print(f"wrote {out_dir}")


def _student_dims(teacher: str, student: Optional[str], student_layers: Optional[str],
                  student_config: Optional[Path], anchor: Optional[str]) -> Optional[dict]:
    """The student's ``config.json`` numbers for the plan check, read without loading weights (None: unknown)."""
    from lmslim.train.parallel import model_dims

    if student is not None:
        return model_dims(student)
    dims = model_dims(teacher)
    if dims is None:
        return None
    dims = dict(dims)
    if student_config is not None:
        from lmslim.compress.distill.student import read_config_file

        dims.update(read_config_file(Path(student_config)))
    elif student_layers is not None and "num_hidden_layers" in dims:
        from lmslim.compress.distill.student import parse_layers

        dims["num_hidden_layers"] = len(parse_layers(str(student_layers), dims["num_hidden_layers"], anchor or "first"))
    return dims


def _run_distill_stage(recipe, stage, out_dir: Path, *, resume: bool, resume_changes: Optional[str], clear: bool,
                       device: str, threads: Optional[int], trust_remote_code: bool) -> dict:
    """The distill stage with ``out_dir`` as its training folder (checkpoints, metrics, the final student)."""
    import torch

    from lmslim.compress.distill.run import publish_summary
    from lmslim.core.runtime import Runtime
    from lmslim.modelio import load_model, resolve
    from lmslim.recipes.stages import STAGES, StageContext
    from lmslim.train import distributed

    t0 = time.perf_counter()
    # Build cached assets before joining the process group: once it is up, transformers' save_pretrained
    # writes nothing on ranks other than 0.
    teacher = recipe.stages[0].options["teacher"]
    for spec in {recipe.model, teacher}:
        resolve(spec)
    runtime = Runtime.create(device=device, threads=threads)
    # Under torchrun: join the process group before any rank writes (the stage clears --out on rank 0).
    distributed.setup(runtime, stage.train.distributed.timeout_s)
    task = recipe.eval.task
    lm = load_model(recipe.model, task="clm" if task == "clm" else "embed", dtype=torch.float32,
                    device=runtime.device, trust_remote_code=trust_remote_code)
    ctx = StageContext(recipe=recipe, runtime=runtime, work_dir=out_dir, input_spec=teacher, resume=resume,
                       resume_changes=resume_changes or (), clear_work_dir=clear,
                       trust_remote_code=trust_remote_code)
    model, tokenizer, report = STAGES["distill"].run(lm, stage, ctx)
    summary = {**report, "data": recipe.data.train, "eval_data": recipe.data.validation,
               "seconds": time.perf_counter() - t0}
    return publish_summary(out_dir, summary, model, tokenizer, untrained=stage.untrained)


def _print_summary(summary: dict) -> None:
    s = summary["student"]
    out.print(f"student: {s['layers']} layers, {s['params'] / 1e6:.1f} M parameters "
              f"(teacher {summary['teacher']['layers']} layers, {summary['teacher']['params'] / 1e6:.1f} M)")
    for b in (summary.get("blockwise") or {}).get("blocks", []):
        out.print(f"  blockwise: block {b['block']} (teacher {b['teacher_span'][0]}-{b['teacher_span'][1] - 1}): "
                  f"relative error {b['loss_before']:.4f} -> {b['loss_after']:.4f}")
    if summary.get("train"):
        t = summary["train"]
        out.print(f"trained {t['steps']} steps: final loss {t['final_loss']:.4f}, {t['tokens_per_s']:,.0f} tokens/s, "
                  f"{t['elapsed_s']:.1f} s")
        for k, v in (t.get("eval") or {}).items():
            out.print(f"  {k}: {v:.4f}")
    else:
        out.print("untrained: saved the initialised student without KD training"
                  + (" (blocks fitted block-wise)" if summary.get("blockwise") else ""))
