"""glibc's heap, where PyTorch's CPU tensors live: reach it, and hand freed memory back to the OS.

Building a model module by module (loading a quantized folder, streaming compression) allocates and
frees per-layer temporaries of a few MB each. glibc raises its mmap threshold after the first such
free, so later temporaries come from the heap, and freed heap pages interleaved with the layers that
stay are kept by the process: on SmolLM2 int8 the load measured ~6 bytes of anonymous memory per
weight instead of 2. ``malloc_trim(0)`` gives every free page back (glibc >= 2.8 releases pages in
the middle of the heap too), so a loader that calls it between layers peaks near the size of what it
returns.

Streaming compression meets a second form of the same problem: each block allocates and frees
Hessians and activations of 4–130 MB, and after the first large free glibc serves everything below
that size from the heap, where freed space stays charged to the process (measured on a 359 M-parameter
Llama: anonymous memory grew from 360 MB to 860 MB over 18 blocks, all of it given back by one
``malloc_trim``). Streaming trims after every block and fixes the threshold at 16 MiB
(:func:`map_large_allocations`), so every tensor of that size or more (Hessians, a block's weights,
activations) is its own mapping, returned to the OS the moment it is freed. Not lower: each mapping
is page-faulted and zeroed anew, and at 1 MiB GPTQ's per-column temporaries made a streamed SmolLM2
run 1.3× slower than the same run in memory (16 MiB: 1.0×, the same peak memory within 40 MiB on
a 359 M model).

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


M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def map_large_allocations(threshold_bytes: int = 16 << 20) -> bool:
    """Serve every allocation of at least ``threshold_bytes`` by its own mmap, for the rest of the process.

    Fixing the threshold turns off glibc's dynamic adjustment (which raises it up to 32 MB as large
    blocks are freed), so freed large tensors never stay in the heap. False where that is not glibc.
    """
    libc = glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))


def return_free_memory() -> bool:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``); False where that is not glibc."""
    libc = glibc()
    return bool(libc is not None and libc.malloc_trim(0))
