"""Exporters: writing a model as a file (llama.cpp's GGUF) or folder (ONNX) another engine runs.

An exporter registers its name, the file suffix it writes, the weight types it offers and one
function ``write(model, tokenizer, path, options) -> report`` that fills ``path`` (a temporary file
in the output's folder, or an empty temporary folder when ``folder`` is set). :func:`export_model`
runs it and publishes the result atomically, so the output is either complete or absent, and the
input model is only read.

Example:
    >>> from lmslim.modelio.export import exporter_names
    >>> "gguf" in exporter_names()
    True
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmslim.core.errors import UserError
from lmslim.core.io import storage_error


@dataclass(frozen=True)
class Exporter:
    name: str
    suffix: str
    types: tuple[str, ...]
    write: Callable[[Any, Any, Path, Any], dict]
    folder: bool = False  # the output is a folder (built in a temporary sibling, then renamed)
    config: type | None = None  # the frozen dataclass of this format's options (what ``write`` takes)
    engine: str = ""  # the engine that runs the output (``lmslim eval/bench --engine``)


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exp: Exporter) -> Exporter:
    if exp.name in _EXPORTERS:
        raise ValueError(f"exporter {exp.name!r} registered twice")
    _EXPORTERS[exp.name] = exp
    return exp


def _ensure_builtin() -> None:
    # Imported on first use so the format modules can import this package.
    from lmslim.modelio.export import gguf, onnx  # noqa: F401


def exporter_names() -> tuple[str, ...]:
    _ensure_builtin()
    return tuple(_EXPORTERS)


def get_exporter(name: str) -> Exporter:
    _ensure_builtin()
    if name not in _EXPORTERS:
        raise UserError(f"unknown export format {name!r}; choose one of: {', '.join(_EXPORTERS)}")
    return _EXPORTERS[name]


def export_model(model, tokenizer, fmt: str, path: Path, options: Any) -> dict:
    """Write ``model`` as ``fmt`` to ``path``: built in a hidden temporary file beside it, then renamed.

    Raises:
        UserError: the model cannot be expressed in the format (the message says why); nothing is left.
    """
    exp = get_exporter(fmt)
    path = Path(path)
    if exp.folder:
        from lmslim.core.io import atomic_dir

        if path.exists() or path.is_symlink():
            raise UserError(f"output {path} already exists; choose a new path")
        with atomic_dir(path) as tmp:
            return exp.write(model, tokenizer, tmp, options)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise storage_error(e, path) or UserError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        report = exp.write(model, tokenizer, tmp, options)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if (err := storage_error(e, path)) is not None:
            raise err from e
        raise
    return report


__all__ = ["Exporter", "export_model", "exporter_names", "get_exporter", "register_exporter"]
