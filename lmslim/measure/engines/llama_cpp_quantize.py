"""llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python): the baseline lmslim's
GGUF exports are compared against.

Input is an f32/f16 GGUF (e.g. ``lmslim export --type f32``); the output is written to a temporary
file beside the destination and renamed into place, so it appears whole or not at all. An importance
matrix (llama.cpp's "imatrix": per tensor, the mean squared input activation of each column) can be
passed as ``{gguf tensor name: (cols,) array}``; the binding hands it to llama.cpp as its
``llama_model_imatrix_data`` list (a ``name = NULL`` entry ends it), which llama.cpp uses for every
type it quantizes with importance weights (k-quants, IQ types, legacy types).

Example (needs ``pip install 'lmslim[engines]'``):
    >>> from pathlib import Path
    >>> llama_quantize(Path("f32.gguf"), Path("q4_k_m.gguf"), "Q4_K_M")  # doctest: +SKIP
    {'ftype': 'Q4_K_M', 'imatrix_tensors': 0, 'bytes': ...}
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lmslim.core.errors import UserError
from lmslim.measure.engines.llama_cpp import require_llama_cpp

log = logging.getLogger(__name__)


def _imatrix(llama_cpp, importance: Mapping[str, Any]):
    """A NULL-terminated ``llama_model_imatrix_data`` array, plus the buffers it points into (keep alive)."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    keep = []
    for i, (name, values) in enumerate(sorted(importance.items())):
        arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if not np.isfinite(arr).all():
            raise UserError(f"importance for {name} has non-finite values")
        name_b = name.encode()
        keep += [arr, name_b]
        entries[i].name = name_b
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    entries[len(importance)].name = None
    return entries, keep


def llama_quantize(src: Path, dst: Path, ftype: str, importance: Mapping[str, Any] | None = None,
                   threads: int = 0) -> dict[str, Any]:
    """Quantize GGUF ``src`` to ``dst`` with llama.cpp's rules for ``ftype`` (Q8_0, Q4_0, Q4_K_M, Q3_K_M, Q2_K, …).

    Raises:
        UserError: missing engine, unknown ftype, missing source, existing destination, or llama.cpp failed.
    """
    llama_cpp = require_llama_cpp()
    src, dst = Path(src), Path(dst)
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise UserError(f"unknown llama.cpp type {ftype!r}; choose one of: {', '.join(known)}")
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    if dst.exists():
        raise UserError(f"output {dst} already exists")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = threads
    keep = None
    if importance:
        entries, keep = _imatrix(llama_cpp, importance)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    fd, tmp = tempfile.mkstemp(suffix=".gguf.part", dir=dst.parent)
    os.close(fd)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"llama.cpp could not quantize {src} to {ftype} (return code {rc})")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    del keep  # the buffers had to outlive the call
    return {"ftype": ftype.upper(), "imatrix_tensors": len(importance or {}), "bytes": dst.stat().st_size}
