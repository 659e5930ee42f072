"""Measuring a GGUF file in llama.cpp (through llama-cpp-python): perplexity and bench.

Perplexity: :class:`LlamaCppLM` answers like a transformers causal LM (``input_ids`` in, ``logits``
out), so :func:`lmslim.measure.eval.perplexity` runs unchanged: the same token stream, BOS framing and
window grid as the PyTorch path; each window is evaluated from an empty KV cache and llama.cpp's
logits for every position are scored in float64. The tokenizer comes from the GGUF file itself
(transformers' GGUF reader), so the ids are the ones the file defines.

Bench: prefill of the same seeded random prompt as ``lmslim.measure.bench`` and exactly ``gen_len``
greedy decode steps, timed by wall clock in a separate process (``llama_cpp_worker.py``) so its
peak RSS is the engine's. Size, parameters, FLOPs and bytes read per token come from the file's
tensor table; the KV cache is llama.cpp's default f16. Fields are those of ``bench.bench``.

Example (needs ``pip install 'lmslim[engines]'``):
    >>> from lmslim.measure.engines.llama_cpp import engine_info
    >>> engine_info()["name"]  # doctest: +SKIP
    'llama.cpp'
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmslim.core.errors import UserError
from lmslim.measure.engines.common import bench_fields, envelope, run_worker

_KV_BYTES = 2  # llama.cpp's default KV cache type is f16


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError("the llama.cpp engine needs llama-cpp-python: pip install 'lmslim[engines]' (it compiles "
                        "llama.cpp for this CPU, ~10 minutes on 2 cores, once)") from e
    return llama_cpp


def engine_info() -> dict[str, str]:
    llama_cpp = require_llama_cpp()
    return {"name": "llama.cpp", "version": getattr(llama_cpp, "__version__", None)
            or metadata.version("llama-cpp-python"), "binding": "llama-cpp-python", "kv_cache": "f16"}


def gguf_meta(path: Path) -> dict[str, Any]:
    """Architecture numbers and the tensor table of a GGUF file (no weights are read)."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many types for a damaged file
        raise UserError(f"{path} could not be read as a GGUF model ({type(e).__name__}: {e})") from e

    def field(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture", "?")
    tensors = {t.name: (int(t.n_elements), int(t.n_bytes), tuple(int(x) for x in t.shape), t.tensor_type.name)
               for t in r.tensors}
    heads = field(f"{arch}.attention.head_count", 0)
    return {"architecture": arch, "context": field(f"{arch}.context_length"),
            "layers": field(f"{arch}.block_count", 0), "heads": heads,
            "kv_heads": field(f"{arch}.attention.head_count_kv", heads),
            "head_dim": field(f"{arch}.attention.key_length")
            or field(f"{arch}.embedding_length", 0) // max(heads, 1), "tensors": tensors}


def gguf_shape(meta: dict[str, Any]):
    """``cost.ModelShape`` of a GGUF model from its tensor table (exact zeros are not counted: unknown)."""
    from lmslim.measure.cost import ModelShape

    t = meta["tensors"]
    tied = "output.weight" not in t
    matrices = {n: v for n, v in t.items() if len(v[2]) == 2}
    # token_embd is a row lookup unless it is also the LM head (tied).
    linear = sum(v[0] for n, v in matrices.items() if n != "token_embd.weight" or tied)
    weight_bytes = sum(v[1] for n, v in t.items() if n != "token_embd.weight" or tied)
    params = sum(v[0] for v in t.values())
    kv = 2 * meta["layers"] * meta["kv_heads"] * meta["head_dim"] * _KV_BYTES
    return ModelShape(n_layers=meta["layers"], n_heads=meta["heads"], n_kv_heads=meta["kv_heads"],
                      head_dim=meta["head_dim"], linear_params=linear, weight_bytes=weight_bytes, params=params,
                      nonzero_params=params, kv_bytes_per_token=kv)


def gguf_tokenizer(path: Path):
    """The Hugging Face tokenizer a GGUF file defines (its vocabulary, merges and special tokens)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file's tokenizer is unusable
        raise UserError(f"{path}: its tokenizer could not be read ({type(e).__name__}: {e})") from e


class LlamaCppLM:
    """A GGUF file in llama.cpp behind the call transformers' causal LMs answer: ``model(input_ids=...).logits``.

    Args:
        n_ctx: longest window that will be evaluated (capped at the model's trained context).
    """

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        llama_cpp = require_llama_cpp()
        meta = gguf_meta(path)
        limit = meta["context"] or n_ctx
        self.n_ctx = min(n_ctx, limit)
        self.config = SimpleNamespace(max_position_embeddings=limit)
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                                       logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"llama.cpp could not load {path} ({e})") from e

    def __call__(self, input_ids, **_):
        import torch

        ids = [int(i) for i in input_ids[0]]
        if len(ids) > self.n_ctx:
            raise UserError(f"a window of {len(ids)} tokens exceeds the llama.cpp context of {self.n_ctx}")
        self.llm.reset()  # every window starts from an empty KV cache, as a fresh PyTorch forward does
        self.llm.eval(ids)
        logits = torch.from_numpy(self.llm.scores[:len(ids)].copy())  # (T, V)
        return SimpleNamespace(logits=logits.unsqueeze(0))

    def close(self) -> None:
        self.llm.close()


def perplexity_gguf(path: Path, documents: list[str], window: int = 512, stride: int = 256,
                    max_tokens: int | None = None, threads: int | None = None, tokenizer=None) -> dict[str, Any]:
    """Perplexity of a GGUF file in llama.cpp on exactly the windows ``eval.perplexity`` uses.

    Args:
        tokenizer: the Hugging Face tokenizer the file was made with (default: read from the file,
            which takes ~1 minute for a 49k vocabulary; pass it when scoring many files of one model).
    """
    from lmslim.measure.eval import perplexity

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer(path)
    lm = LlamaCppLM(path, window, threads)
    try:
        return perplexity(lm, tokenizer, documents, window=window, stride=stride, max_tokens=max_tokens)
    finally:
        lm.close()


def bench_gguf(path: Path, cfg, threads: int) -> dict[str, Any]:
    """Cost of running a GGUF file in llama.cpp; the fields of ``lmslim.measure.bench.bench``."""
    import torch

    from lmslim.measure.bench import _prompt

    require_llama_cpp()
    if cfg.batch != 1:
        raise UserError("--engine llama.cpp benches one sequence at a time; use --batch 1")
    path = Path(path)
    meta = gguf_meta(path)
    if meta["context"] and cfg.prompt_len + cfg.gen_len > meta["context"]:
        raise UserError(f"prompt-len + gen-len = {cfg.prompt_len + cfg.gen_len} exceeds the model's "
                        f"{meta['context']} positions")
    vocab = meta["tensors"].get("token_embd.weight", (0, 0, (0, 2)))[2][1]
    prompt = _prompt(vocab, cfg, torch.device("cpu"))[0].tolist()
    args = {"path": str(path), "prompt": prompt, "gen_len": cfg.gen_len, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "threads": threads}
    run = run_worker(Path(__file__).with_name("llama_cpp_worker.py"), args, "llama.cpp", path)
    result = bench_fields(run, gguf_shape(meta), cfg, path.stat().st_size, "llama.cpp (its own kernels and threads)")
    counts: dict[str, int] = {}
    for v in meta["tensors"].values():
        counts[v[3]] = counts.get(v[3], 0) + 1
    result["gguf_types"] = counts
    return result


def envelope_gguf(kind: str, spec: str, path: Path, threads: int) -> dict[str, Any]:
    """The result header (``meta.envelope``'s fields) for a GGUF file measured in llama.cpp."""
    from lmslim.core.io import sha256_file

    return envelope(kind, spec, path, threads, source="gguf", architecture=f"llama.cpp:{gguf_meta(path)['architecture']}",
                    weights_sha256=sha256_file(path), info=engine_info(),
                    library=("llama-cpp-python", metadata.version("llama-cpp-python")))
