"""Engines a model can be measured in: PyTorch (lmslim's own modules) or the engine users deploy.

``torch`` loads any model spec into PyTorch (a ``.gguf`` is dequantized first). ``llama.cpp`` runs a
``.gguf`` file as it is, in llama.cpp (``llama_cpp.py``); ``onnxruntime`` runs an ONNX export
folder (``lmslim export --format onnx``) in ONNX Runtime (``onnxruntime.py``). Both use the same
perplexity windows and bench fields as the torch path, so results compare across engines. Each
result names its engine.

Example:
    >>> from lmslim.measure.engines import check_engine
    >>> check_engine("torch", "builtin:tiny-llama")
    'torch'
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lmslim.core.errors import UserError

ENGINES = ("torch", "llama.cpp", "onnxruntime")


def check_engine(engine: str, model: str) -> str:
    """The engine name, after checking it can run ``model`` (a spec); UserError otherwise."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "llama.cpp":
        path = Path(model).expanduser()
        if path.suffix != ".gguf":
            raise UserError(f"--engine llama.cpp runs a .gguf file; {model} is not one (make one with "
                            "`lmslim export MODEL --format gguf --out FILE.gguf`)")
        if not path.is_file():
            raise UserError(f"model path {model} does not exist")
    if engine == "onnxruntime":
        from lmslim.modelio.export.onnx import is_onnx_export

        if not is_onnx_export(Path(model).expanduser()):
            raise UserError(f"--engine onnxruntime runs an ONNX export folder; {model} is not one (make one with "
                            "`lmslim export MODEL --format onnx --out DIR`)")
    return engine


def engine_api(engine: str) -> SimpleNamespace:
    """A deployment engine's functions: ``require`` (a one-line error when it is not installed),
    ``perplexity``, ``bench``, ``envelope``, ``info``, and ``dtype`` (what bench settings record).

    ``torch`` is measured by ``lmslim.measure.eval`` / ``bench`` directly and has no entry here.
    """
    if engine == "llama.cpp":
        from lmslim.measure.engines import llama_cpp as m

        return SimpleNamespace(require=m.require_llama_cpp, perplexity=m.perplexity_gguf, bench=m.bench_gguf,
                               envelope=m.envelope_gguf, info=m.engine_info, dtype="gguf")
    if engine == "onnxruntime":
        from lmslim.measure.engines import onnxruntime as m

        return SimpleNamespace(require=m.require_onnxruntime, perplexity=m.perplexity_onnx, bench=m.bench_onnx,
                               envelope=m.envelope_onnx, info=m.engine_info, dtype="onnx")
    raise UserError(f"unknown deployment engine {engine!r}")


def require_engine(engine: str) -> None:
    """A one-line ``UserError`` when ``engine`` cannot run here (not installed); torch always can."""
    if engine != "torch":
        engine_api(engine).require()


def engine_info(engine: str) -> dict[str, str]:
    """``{"name", "version"}`` of an engine as installed."""
    if engine != "torch":
        return engine_api(engine).info()
    import torch

    return {"name": "torch", "version": torch.__version__}
