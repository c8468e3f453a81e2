"""Preallocated page-aligned read buffers, one per read thread, reused batch after batch.

O_DIRECT needs the destination aligned to the device's logical block (4 KiB covers every device
here); an anonymous ``mmap`` is page-aligned. Each read-pool thread keeps one buffer of
``size`` bytes; a read larger than that gets a one-off buffer that is freed when its last view goes.
"""

from __future__ import annotations

import mmap
import threading


class ReadBuffers:
    """Per-thread aligned buffers of ``size`` bytes (allocated on a thread's first use)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()

    def get(self, nbytes: int) -> memoryview:
        """A writable, page-aligned view of ``nbytes`` bytes for the calling thread's next read.

        The view is valid until this thread asks again; callers copy out what they keep.
        """
        if nbytes > self.size:
            return memoryview(mmap.mmap(-1, nbytes))[:nbytes]
        view = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = memoryview(mmap.mmap(-1, self.size))
        return view[:nbytes]
