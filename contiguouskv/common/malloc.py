"""glibc malloc settings for processes that move ~1 MiB messages: keep freed buffers for reuse.

Every Fetch response is a ~1 MiB bytes object, built on the cache server and received on the compute
server. With glibc's defaults such a block is served by ``mmap`` or returned to the kernel soon after
it is freed, so each new one lands in fresh pages: ~256 page faults and zeroed pages per MiB, on
both sides. :func:`keep_freed_buffers` serves blocks up to 4 MiB from the heap and trims the heap
only past 64 MiB free, so the same memory is reused. Measured with ``contiguouskv bench storage``
on the 2-core machine: gRPC Fetch from disk 0.51-0.63 -> 0.84-0.93 GB/s at the 100 % selection
(docs/storage.md). The cost is up to 64 MiB of freed memory kept per malloc arena.

A process with many threads (the compute server: one per admitted request) also caps the number of
malloc arenas (``max_arenas``), or each thread's arena would keep its own 64 MiB: measured, 200
cancelled and normal Re-Prefill calls grew the compute server's RSS by 7 % without the cap.

An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` wins: then nothing is set
(and ``MALLOC_ARENA_MAX`` wins over ``max_arenas``).

What is kept is kept for the next request. When a server goes idle, :func:`return_free_memory`
(``malloc_trim``) gives the kept memory back, so an idle server's RSS returns to where it was: the
compute server calls it when its last admitted request finishes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
ENV_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_buffers(env: Mapping[str, str], max_arenas: int = 0) -> bool:
    """Apply the settings in this process (glibc only); ``True`` if they were applied.

    ``max_arenas``: at most this many malloc arenas (0: glibc's default, 8 per core)."""
    if not sys.platform.startswith("linux") or any(name in env for name in ENV_OVERRIDES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if max_arenas and "MALLOC_ARENA_MAX" not in env:
        applied = applied and bool(mallopt(M_ARENA_MAX, max_arenas))
    log.debug("malloc: mmap threshold %d, trim threshold %d (%s)", MMAP_THRESHOLD_BYTES,
              TRIM_THRESHOLD_BYTES, "applied" if applied else "refused")
    return applied


def return_free_memory() -> bool:
    """Return the free memory of every malloc arena to the kernel (glibc's ``malloc_trim(0)``);
    ``True`` if some was returned. A no-op off glibc. Takes milliseconds: call it off the event loop."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
