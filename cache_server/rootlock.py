"""One cache server per store root: an exclusive advisory lock on ``<root>/.lock`` while it serves.

A second server on the same root would run crash recovery on files the first is writing (removing
its uncommitted objects as leftovers) and serve a store it does not index. The lock is ``flock``
on a file that names the holder's pid; the kernel drops it when the holder exits, however it
exits, so a crashed server never leaves the root locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class RootInUse(OSError):
    """Another live process holds the root."""


@contextlib.contextmanager
def hold_root(root: Path) -> Iterator[None]:
    """Hold ``root``'s lock (creating the root if needed); ``RootInUse`` if another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RootInUse(f"root {root} is in use by another cache server (pid {holder}); "
                            "give each server its own --root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
