"""glibc's heap, where PyTorch's CPU tensors live: reach it, and hand freed memory back to the OS.

Building a model module by module (loading a quantized folder, streaming compression) allocates and
frees per-layer temporaries of a few MB each. glibc raises its mmap threshold after the first such
free, so later temporaries come from the heap, and freed heap pages interleaved with the layers that
stay are kept by the process: on SmolLM2 int8 the load measured ~6 bytes of anonymous memory per
weight instead of 2. ``malloc_trim(0)`` gives every free page back (glibc >= 2.8 releases pages in
the middle of the heap too), so a loader that calls it between layers peaks near the size of what it
returns.

Example:
    >>> from lmslim.core.hostmem import return_free_memory
    >>> return_free_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import functools
import platform


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None on another C library or OS."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_free_memory() -> bool:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``); False where that is not glibc."""
    libc = glibc()
    return bool(libc is not None and libc.malloc_trim(0))
