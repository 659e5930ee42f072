"""``lmslim eval`` / ``lmslim bench`` in a deployment engine: the exported model as it ships.

``--engine llama.cpp`` runs a ``.gguf`` file, ``--engine onnxruntime`` an ONNX export folder. The
torch path stays in ``main.py``; these write results with the same fields plus ``engine`` (name,
version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.table import Table

from lmslim.cli.common import out, write_json
from lmslim.core.errors import UserError
from lmslim.measure.engines import engine_api


def _table(title: str, metrics: dict, fmt: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            table.add_row(k, fmt.format(v) if isinstance(v, float) else f"{v:,}")
    return table


def _threads(threads: Optional[int]) -> int:
    import os

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    return threads or len(os.sched_getaffinity(0))


def eval_in_engine(engine: str, model: str, data: str, task: str, window: int, stride: int,
                   max_tokens: Optional[int], json_out: Optional[Path], threads: Optional[int],
                   text_column: Optional[str], label_column: Optional[str]) -> None:
    from lmslim.data.spec import load_data

    if task != "clm":
        raise UserError(f"--engine {engine} measures perplexity (--task clm), not {task}")
    api = engine_api(engine)
    api.require()
    n = _threads(threads)
    ds = load_data(data, task=task, text_column=text_column, label_column=label_column)
    path = Path(model).expanduser()
    metrics = api.perplexity(path, ds.documents, window=window, stride=stride, max_tokens=max_tokens, threads=n)
    result = api.envelope("eval", model, path, n)
    result["task"] = task
    result["data"] = {"spec": data, "examples": len(ds), "tokens": metrics["tokens_scored"]}
    result.update(metrics)
    out.print(_table(f"eval {model} on {data} (clm, {engine})", metrics, "{:.4f}"))
    write_json(json_out, result)


def bench_in_engine(engine: str, model: str, cfg, task: str, json_out: Optional[Path], threads: Optional[int]) -> None:
    if task not in ("auto", "clm"):
        raise UserError(f"--engine {engine} benches causal LMs (--task clm), not {task}")
    api = engine_api(engine)
    n = _threads(threads)
    path = Path(model).expanduser()
    metrics = api.bench(path, cfg, n)
    result = api.envelope("bench", model, path, n)
    result["task"] = "clm"
    result["settings"] = {"batch": cfg.batch, "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len,
                          "repeats": cfg.repeats, "warmup": cfg.warmup, "threads": n, "dtype": api.dtype}
    result.update(metrics)
    out.print(_table(f"bench {model} ({engine}, {n} threads)", metrics, "{:,.2f}"))
    for note in metrics["notes"]:
        out.print(f"• {note}", soft_wrap=True)
    write_json(json_out, result)
