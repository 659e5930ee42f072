"""``lmslim distill`` (teacher → student) and ``lmslim share`` (ALBERT cross-layer sharing)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from lmslim.cli.common import DeviceOpt, ThreadsOpt, TrustOpt, app, guard_out, hold, out
from lmslim.cli.launch import MasterAddrOpt, MasterPortOpt, NnodesOpt, NodeRankOpt, NprocOpt
from lmslim.core.errors import UserError


@app.command()
def share(
    model: str = typer.Argument(..., help="Model spec (full precision, not already shared)."),
    group_size: int = typer.Option(..., "--group-size", help="Consecutive layers that share one set of weights (>= 2)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    init: str = typer.Option("mean", "--init", help="mean | first | index: initial shared weights of each group."),
    index: int = typer.Option(0, "--index", help="With --init index: which layer of each group (0-based)."),
    keep_norms: bool = typer.Option(True, "--keep-norms/--share-norms", help="Keep per-layer norm weights."),
    task: str = typer.Option("auto", "--task", help="auto (from the architecture), clm or embed."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
) -> None:
    """Share block weights across groups of consecutive layers (ALBERT); fewer parameters, same FLOPs.

    Quality drops until the shared model is re-trained: recover it with
    ``lmslim distill --teacher MODEL --student OUT ...``.
    """
    from lmslim.compress.share import ShareConfig, share_
    from lmslim.modelio import save_model
    from lmslim.core.io import atomic_dir
    from lmslim.modelio import load_model, resolve
    from lmslim.core.runtime import Runtime

    config = ShareConfig(group_size=group_size, init=init, index=index, keep_norms=keep_norms)
    if task not in ("auto", "clm", "embed"):
        raise UserError(f"share --task must be auto, clm or embed, got {task!r}")
    guard_out(out_dir, inputs=[model], overwrite=overwrite)
    rt = Runtime.create(device="cpu", threads=threads)
    if task == "auto":
        from lmslim.cli.main import _causal_or_embed

        task = _causal_or_embed(resolve(model))
    lm = load_model(model, task=task, dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    size_before = lm.resolved.size_bytes()
    t0 = time.perf_counter()
    report = share_(lm.model, config)
    with atomic_dir(out_dir) as tmp:
        save_model(lm.model, lm.tokenizer, tmp)
        size_after = (tmp / "model.safetensors").stat().st_size
        report.update({"model": model, "weights_sha256": lm.resolved.weights_hash(), "config": config.__dict__,
                       "size_mb_before": size_before / 1e6, "size_mb_after": size_after / 1e6,
                       "seconds": time.perf_counter() - t0})
        (tmp / "lmslim_share.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.print(f"share: {len(report['groups'])} groups of <= {group_size} layers; parameters "
              f"{report['params_before'] / 1e6:.2f} M -> {report['params_after'] / 1e6:.2f} M (unique); "
              f"{size_before / 1e6:.1f} MB -> {size_after / 1e6:.1f} MB on disk. FLOPs per token are unchanged "
              "(every layer still runs); quality needs recovery (lmslim distill).", soft_wrap=True)
    out.print(f"wrote {out_dir}")


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
    anchor: str = typer.Option("first", "--anchor", help="With --student-layers K: first (layers 0, K, 2K, ... as "
                               "DistilBERT), last (the last layer and every K-th before it) or spread (first and "
                               "last kept, the rest evenly spaced)."),
    data: str = typer.Option(..., "--data", help="Training text (clm) or sentences (embed)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: student, metrics.jsonl, checkpoints."),
    task: str = typer.Option("clm", "--task", help="clm (logit KD) or embed (pooled sentence embeddings)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the hard-label CE; 1-alpha weighs the soft KL."),
    temperature: float = typer.Option(2.0, "--temperature", help="Softmax temperature T > 0 (KL scaled by T^2)."),
    hidden_loss: str = typer.Option("mse", "--hidden-loss", help="mse | cosine between hidden states."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="Weight of the hidden-state loss (0 = off)."),
    layer_map: str = typer.Option("uniform", "--layer-map", help="uniform | last | kept | pairs like 1:2,2:4."),
    attention_weight: float = typer.Option(0.0, "--attention-weight", help="Weight of the attention-map KL "
                                           "(0 = off; needs equal head counts; uses eager attention)."),
    embed_loss: str = typer.Option("cosine", "--embed-loss", help="embed: cosine | mse on pooled embeddings."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Folder caching the teacher's "
                                                 "top-k logits per row; later runs on the same text skip the teacher "
                                                 "(clm logit KD only; soft targets use the top-k)."),
    top_k: int = typer.Option(64, "--top-k", help="Logits per position kept in --teacher-cache."),
    blockwise_epochs: int = typer.Option(0, "--blockwise-epochs", help="Before KD, re-fit each block of a student "
                                         "cut with --student-layers to the teacher blocks it replaces, this many "
                                         "passes over the calibration rows (0 = off; see docs/distill.md)."),
    blockwise_samples: int = typer.Option(128, "--blockwise-samples", help="Calibration rows for --blockwise-epochs "
                                          "(from --data)."),
    blockwise_seq_len: int = typer.Option(256, "--blockwise-seq-len", help="Tokens per calibration row."),
    blockwise_lr: float = typer.Option(1e-3, "--blockwise-lr", help="Learning rate of the block-wise fit."),
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
    (--student-config); then trained with the training engine against the frozen teacher.
    """
    from lmslim.cli.train_cmd import check_out_dir, remove_unfinished_start
    from lmslim.compress.distill import DistillConfig
    from lmslim.compress.distill.blockwise import BlockwiseConfig
    from lmslim.compress.distill.run import run_distill
    from lmslim.train.config import TrainConfig

    dcfg = DistillConfig(task=task, alpha=alpha, temperature=temperature, hidden_weight=hidden_weight,
                         hidden_loss=hidden_loss, layer_map=layer_map, attention_weight=attention_weight,
                         embed_loss=embed_loss)
    sources = [s for s in (student, student_layers, student_config) if s is not None]
    if len(sources) != 1:
        raise UserError("give exactly one of --student MODEL, --student-layers K and --student-config FILE")
    blockwise = BlockwiseConfig(epochs=blockwise_epochs, samples=blockwise_samples, seq_len=blockwise_seq_len,
                                lr=blockwise_lr)
    if blockwise.epochs and (student_layers is None or task != "clm"):
        raise UserError("--blockwise-epochs needs a clm student cut from the teacher with --student-layers")
    items = list(overrides or [])
    if max_steps is not None:
        if max_steps < 0:
            raise UserError(f"--max-steps must be >= 0, got {max_steps}")
        if max_steps > 0:
            items.append(f"max_steps={max_steps}")
    for key, value in (("batch.batch_size", batch_size), ("optim.lr", lr), ("precision.mode", precision)):
        if value is not None:
            items.append(f"{key}={value}")
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if teacher_cache is not None and (task != "clm" or hidden_weight > 0 or attention_weight > 0):
        raise UserError("--teacher-cache holds top-k logits only (task clm); drop it or the hidden-state / "
                        "attention losses")
    tcfg = TrainConfig.from_yaml(config, items)
    if max_steps == 0 and resume:
        raise UserError("--max-steps 0 saves the untrained student; there is nothing to --resume")
    inputs = [teacher, student, student_config, data, eval_data, config]
    stale, lock = check_out_dir(out_dir, resume, overwrite, inputs)
    hold(lock)
    if teacher_cache is not None:
        from lmslim.core.guard import check_no_overlap

        check_no_overlap(teacher_cache, [*inputs, out_dir], "--teacher-cache")
    if nproc is not None:
        if max_steps == 0:
            raise UserError("--max-steps 0 only saves the initialised student; drop --nproc")
        from lmslim.cli.launch import launch

        launch(ctx.obj["argv"], nproc, nnodes, node_rank, master_addr, master_port, threads)
        return
    from lmslim.modelio import resolve
    from lmslim.core.runtime import Runtime
    from lmslim.train import distributed

    # Build cached assets before joining the process group: once it is up, transformers' save_pretrained
    # writes nothing on ranks other than 0.
    for spec in (teacher, student):
        if spec:
            resolve(spec)
    # Under torchrun: join the process group before any rank writes (run_distill clears --out on rank 0).
    distributed.setup(Runtime.create(device=device, threads=threads), tcfg.distributed.timeout_s)
    with remove_unfinished_start(out_dir):
        summary = run_distill(
            teacher=teacher, student=student, student_layers=student_layers, student_config=student_config,
            anchor=anchor, data=data, eval_data=eval_data, out_dir=out_dir, distill_config=dcfg, train_config=tcfg,
            untrained=max_steps == 0, resume=resume, resume_changes=resume_changes or (),
            overwrite=overwrite or stale, device=device, threads=threads,
            trust_remote_code=trust_remote_code, teacher_cache=teacher_cache, top_k=top_k,
            blockwise=blockwise if blockwise.epochs else None)
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
        out.print("--max-steps 0: saved the initialised student without KD training"
                  + (" (blocks fitted block-wise)" if summary.get("blockwise") else ""))
    out.print(f"wrote {out_dir}")
