"""glibc malloc tuning for ~1 MiB messages: applied by default, never over an operator's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contiguouskv.common import malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_applied_in_a_fresh_process_and_skipped_when_the_operator_set_it() -> None:
    code = "import os; from contiguouskv.common.malloc import keep_freed_buffers as k; print(k(os.environ))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin"})
    assert fresh.stdout.strip() == "True"
    assert malloc.keep_freed_buffers({"MALLOC_TRIM_THRESHOLD_": "1048576"}) is False
    assert malloc.keep_freed_buffers({"MALLOC_MMAP_THRESHOLD_": "1048576"}) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim exists on Linux only")
def test_return_free_memory_gives_kept_memory_back_to_the_kernel() -> None:
    """With the servers' settings freed ~1 MiB blocks stay in the heap (that is the point) unless they
    are its top; trimming returns the holes too: the process's RSS drops by most of what was freed."""
    code = """
import os, ctypes
from contiguouskv.common.malloc import keep_freed_buffers, return_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert keep_freed_buffers(os.environ)
blocks, pins = [], []
for _ in range(200):  # 200 MiB in 1 MiB blocks (below the mmap threshold), each followed by a small block
    blocks.append(bytearray(1 << 20))  # that stays: the freed blocks are holes, not the heap's top
    pins.append(bytearray(64))
held = rss()
del blocks
kept = rss()
print(return_free_memory(), held - kept, kept - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.split()
    trimmed, freed_at_free, freed_at_trim = out[0] == "True", int(out[1]), int(out[2])
    assert freed_at_free < 100 << 20  # freeing alone kept most of it (the heap kept the blocks)
    assert trimmed and freed_at_trim > 100 << 20  # the trim gave it back
