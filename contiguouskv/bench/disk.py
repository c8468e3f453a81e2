"""Raw disk bandwidth at a given request size: O_DIRECT random reads, many in flight.

Used for each policy's physical floor: the bytes it must read divided by what the disk delivers at
that policy's request size, measured in the same run on the same files.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096


def raw_read_gbps(files: list[Path], request_bytes: int, total_bytes: int = 256 << 20, depth: int = 16,
                  seed: int = 0) -> float:
    """GB/s of random, aligned, O_DIRECT reads of ``request_bytes`` spread over ``files``.

    Raises OSError when O_DIRECT is not supported (then a page-cache-free number cannot be had).
    """
    size = max(ALIGN, request_bytes - request_bytes % ALIGN)
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
    try:
        spans = [(fd, os.fstat(fd).st_size // ALIGN * ALIGN) for fd in fds]
        spans = [(fd, n) for fd, n in spans if n >= size]
        if not spans:
            raise ValueError(f"no file holds a {size}-byte read")
        rng = random.Random(seed)
        count = max(depth, total_bytes // size)
        plan = []
        for _ in range(count):
            fd, n = rng.choice(spans)
            plan.append((fd, rng.randrange(0, (n - size) // ALIGN + 1) * ALIGN))

        def worker(part: list[tuple[int, int]]) -> int:
            buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
            try:
                return sum(os.preadv(fd, [buf], off) for fd, off in part)
            finally:
                buf.close()

        parts = [plan[i::depth] for i in range(depth)]
        start = time.perf_counter()
        with ThreadPoolExecutor(depth) as pool:
            done = sum(pool.map(worker, parts))
        return done / (time.perf_counter() - start) / 1e9
    finally:
        for fd in fds:
            os.close(fd)
