"""Per-object shared memory for the DRAM cache: an :class:`Arena` mirrors one object's data file.

An arena is an anonymous ``memfd`` as large as the object's data file, sparse: a record the DRAM
cache keeps is written at its file offset, and only the pages written hold memory. Records start on
4 KiB boundaries and own their pages (``manifest.stride_of``), so freeing a record
(``MADV_REMOVE``) gives its pages back without touching a neighbour. The memfd is sealed against
growing and shrinking, so no holder of a descriptor can truncate it under the server.

Co-located compute servers get a read-only descriptor of it (:meth:`Arena.reader_fd`: the memfd
reopened ``O_RDONLY``, so it can only be mapped ``PROT_READ``), sent over the shared-memory plane's
socket once they have opened the object with a Fetch call; a DRAM hit is then a descriptor naming
offsets in a mapping they already hold, with no copy on the server (:mod:`.shm_plane`). The DRAM
cache never writes a record's pages while a client may read them: a record is written once when
admitted, the bytes of an object never change (a re-stored prefix is a new object, hence a new
arena), and a record evicted while a client holds it is freed only when the last hold goes
(:class:`~.dram_cache.DramCache` pins).
"""

from __future__ import annotations

import fcntl
import mmap
import os

PAGE = mmap.PAGESIZE


def arenas_supported() -> bool:
    """Whether this kernel gives sealable memfds and a ``/proc`` to reopen them read-only."""
    if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        return False
    try:
        fd = os.memfd_create("ckv-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Arena:
    """One object's records in a sealed memfd of ``size`` bytes (its data file's size).

    Thread-safety is the caller's (the DRAM cache calls it under its lock).
    """

    def __init__(self, number: int, size: int) -> None:
        if size <= 0:
            raise ValueError(f"arena of {size} bytes")
        self.number = number
        self.size = -(-size // PAGE) * PAGE
        self.fd = os.memfd_create(f"ckv-dram-{number}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)
        self.records = 0  # records kept in it (cached or retired), counted by the DRAM cache
        self.closed = False

    def put(self, offset: int, payload: memoryview | bytes) -> memoryview:
        """Write a record at its file offset; its bytes there, read-only."""
        end = offset + len(payload)
        if offset % PAGE or end > self.size:
            raise ValueError(f"record [{offset}, {end}) is not page-aligned inside an arena of {self.size} bytes")
        self._view[offset:end] = payload
        return self._view[offset:end].toreadonly()

    def free(self, offset: int, length: int) -> None:
        """Give the pages of the record at ``offset`` back to the kernel (they read as zeros after)."""
        if not self.closed:
            self._map.madvise(mmap.MADV_REMOVE, offset, -(-length // PAGE) * PAGE)

    def reader_fd(self) -> int:
        """A new read-only descriptor of the arena (the caller closes it)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Free every page and drop the server's descriptor (once nothing in it is cached or pinned);
        the mapping goes with the last view, the memfd with the last client mapping."""
        if not self.closed:
            self.closed = True
            self._map.madvise(mmap.MADV_REMOVE, 0, self.size)  # nothing cached is left: free it all now
            os.close(self.fd)
