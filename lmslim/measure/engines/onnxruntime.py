"""Measuring an ONNX export folder in ONNX Runtime (CPU): perplexity and bench.

Perplexity: :class:`OnnxRuntimeLM` answers like a transformers causal LM (``input_ids`` in,
``logits`` out), so :func:`lmslim.measure.eval.perplexity` runs unchanged: the same token stream,
BOS framing and window grid as the PyTorch path; each window is one call with empty KV caches
(a fresh prefill, as a PyTorch forward is). The tokenizer is the one saved in the folder.

Bench: prefill of the same seeded random prompt as ``lmslim.measure.bench`` and exactly ``gen_len``
greedy decode steps feeding the ``present`` caches back, timed by wall clock in a separate process
(``onnxruntime_worker.py``) so its peak RSS is the engine's. Parameters, FLOPs and bytes read per
token come from the export's ``config.json`` (counted on the graph when it was written); size is
the folder's ``model.onnx`` + ``model.onnx.data``. The KV cache is float32. Fields are those of
``bench.bench``.

Example (needs ``pip install 'lmslim[engines]'``):
    >>> from lmslim.measure.engines.onnxruntime import engine_info
    >>> engine_info()["name"]  # doctest: +SKIP
    'onnxruntime'
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmslim.core.errors import UserError
from lmslim.measure.engines.common import bench_fields, envelope, run_worker
from lmslim.modelio.export.onnx import DATA_FILE, META_KEY, MODEL_FILE


def require_onnxruntime():
    """The ``onnxruntime`` module, or a one-line error saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError("the onnxruntime engine needs onnxruntime: pip install 'lmslim[engines]'") from e
    return onnxruntime


def engine_info() -> dict[str, str]:
    ort = require_onnxruntime()
    return {"name": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
            "kv_cache": "f32"}


def export_meta(folder: Path) -> dict[str, Any]:
    """The export's ``lmslim_onnx`` section plus the model's vocabulary and position limit."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
        meta = dict(cfg[META_KEY])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder} is not an lmslim ONNX export (config.json with {META_KEY!r}): {e}") from e
    meta["vocab"] = int(cfg["vocab_size"])
    meta["context"] = int(cfg.get("max_position_embeddings") or 0)
    return meta


def onnx_shape(meta: dict[str, Any]):
    """``cost.ModelShape`` of an export from the numbers counted when it was written."""
    from lmslim.measure.cost import ModelShape

    c = meta["cost"]
    return ModelShape(n_layers=c["layers"], n_heads=c["heads"], n_kv_heads=c["kv_heads"], head_dim=c["head_dim"],
                      linear_params=c["linear_params"], weight_bytes=c["weight_bytes"], params=c["params"],
                      nonzero_params=c["params"], kv_bytes_per_token=c["kv_bytes_per_token"])


def export_size(folder: Path) -> int:
    return sum((Path(folder) / n).stat().st_size for n in (MODEL_FILE, DATA_FILE) if (Path(folder) / n).is_file())


def session(folder: Path, threads: int | None):
    """An ORT CPU session on the folder's model (all graph optimizations, ``threads`` intra-op threads)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(Path(folder) / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for a bad model
        raise UserError(f"onnxruntime could not load {folder} ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def empty_cache(meta: dict[str, Any], batch: int) -> dict[str, Any]:
    """Zero-length past key/value inputs: the next call is a prefill from position 0."""
    import numpy as np

    d = meta["cost"]["head_dim"]
    return {f"past_key_values.{i}.{k}": np.zeros((batch, layer["kv_heads"], 0, d), np.float32)
            for i, layer in enumerate(meta["layers"]) for k in ("key", "value")}


class OnnxRuntimeLM:
    """An ONNX export in ONNX Runtime behind the call transformers' causal LMs answer."""

    def __init__(self, folder: Path, threads: int | None = None):
        self.meta = export_meta(folder)
        self.session = session(folder, threads)
        self.config = SimpleNamespace(max_position_embeddings=self.meta["context"] or None)

    def __call__(self, input_ids, **_):
        import numpy as np
        import torch

        ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids, dtype=np.int64)
        feeds = {"input_ids": ids, **empty_cache(self.meta, ids.shape[0])}
        logits = self.session.run(["logits"], feeds)[0]  # (B, T, V)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def perplexity_onnx(folder: Path, documents: list[str], window: int = 512, stride: int = 256,
                    max_tokens: int | None = None, threads: int | None = None, tokenizer=None) -> dict[str, Any]:
    """Perplexity of an ONNX export in ONNX Runtime on exactly the windows ``eval.perplexity`` uses."""
    from transformers import AutoTokenizer

    from lmslim.measure.eval import perplexity

    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
    return perplexity(OnnxRuntimeLM(folder, threads), tokenizer, documents, window=window, stride=stride,
                      max_tokens=max_tokens)


def bench_onnx(folder: Path, cfg, threads: int) -> dict[str, Any]:
    """Cost of running an ONNX export in ONNX Runtime; the fields of ``lmslim.measure.bench.bench``."""
    import torch

    from lmslim.measure.bench import _prompt

    require_onnxruntime()
    folder = Path(folder)
    meta = export_meta(folder)
    if meta["context"] and cfg.prompt_len + cfg.gen_len > meta["context"]:
        raise UserError(f"prompt-len + gen-len = {cfg.prompt_len + cfg.gen_len} exceeds the model's "
                        f"{meta['context']} positions")
    prompt = _prompt(meta["vocab"], cfg, torch.device("cpu")).tolist()
    args = {"folder": str(folder), "prompt": prompt, "gen_len": cfg.gen_len, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "threads": threads, "head_dim": meta["cost"]["head_dim"],
            "kv_heads": [layer["kv_heads"] for layer in meta["layers"]]}
    run = run_worker(Path(__file__).with_name("onnxruntime_worker.py"), args, "onnxruntime", folder)
    result = bench_fields(run, onnx_shape(meta), cfg, export_size(folder),
                          "ONNX Runtime (CPU provider, its own kernels and threads)")
    result["onnx_type"] = meta["type"]
    return result


def envelope_onnx(kind: str, spec: str, folder: Path, threads: int) -> dict[str, Any]:
    """The result header (``meta.envelope``'s fields) for an ONNX export measured in ONNX Runtime."""
    from lmslim.core.io import sha256_file

    folder = Path(folder)
    info = engine_info()
    weights = folder / DATA_FILE if (folder / DATA_FILE).is_file() else folder / MODEL_FILE
    return envelope(kind, spec, folder, threads, source="onnx", architecture=f"onnx:llama ({export_meta(folder)['type']})",
                    weights_sha256=sha256_file(weights), info=info, library=("onnxruntime", info["version"]))
