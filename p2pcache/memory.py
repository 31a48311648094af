"""glibc malloc settings for the long-running daemon: big buffers kept in the heap, not handed back per request.

Owns the one process-wide knob (`mallopt`); must not be called by library code, only by the daemon's start.

Why: an upload's body arrives in 1 MiB joins (`aio.feed_thread`), its chunks are copied out of those, and the
pack writer holds a few batches at once. With glibc's defaults the heap's free top is trimmed back to the
kernel once it exceeds twice the largest buffer freed so far (~2 MiB), so every upload grew the heap again and
paid a page fault plus a cleared page for each 4 KiB it touched: 16-24 k minor faults per 109 MiB NAR upload
(`/proc/PID/stat`), 17 % of the daemon's CPU in `clear_page_erms` under `perf record`. With the thresholds
below a daemon reuses the same pages from one upload to the next (6-11 k faults, about what the first upload
needs to grow the heap once). The cost is up to `TRIM_THRESHOLD` of free heap kept per malloc arena.

An operator's own `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment, or either threshold in
`GLIBC_TUNABLES` (`glibc.malloc.mmap_threshold`, `glibc.malloc.trim_threshold`), win: then nothing is set.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20  # blocks above this get their own mapping (glibc's dynamic default stops at 32 MiB)
TRIM_THRESHOLD = 32 << 20  # free heap above this at the top goes back to the kernel
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def _set_by_operator() -> bool:
    if any(name in os.environ for name in _ENV):
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(item.split("=", 1)[0] in _TUNABLES for item in tunables.split(":"))


def keep_heap() -> bool:
    """Set the thresholds (once, at the daemon's start); False where there is no glibc `mallopt` or the
    environment sets them already."""
    if _set_by_operator():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt of these)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
