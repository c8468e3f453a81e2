"""Reading records of one committed object: aligned, coalesced, checksum-verified.

An :class:`ObjectReader` holds the object's open data file descriptor, so it keeps working after a
concurrent delete unlinks the file. Reads are blocking; callers run them on a thread pool, never on
the event loop. Several threads may read through one reader at once.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence

from contiguouskv.common.checksum import crc32
from contiguouskv.cache_server.errors import CacheError, DataLoss
from contiguouskv.cache_server.manifest import Manifest, RegionLayout
from contiguouskv.cache_server.stats import Counters


def coalesce(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Runs ``(first, count)`` of adjacent record indices covering the distinct ``indices``.

    Runs come in ascending order; each index appears in exactly one run.
    """
    runs: list[tuple[int, int]] = []
    for index in sorted(set(indices)):
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


class ObjectReader:
    """Reads records of one object through one file descriptor until :meth:`close`.

    ``direct`` says whether ``fd`` was opened with O_DIRECT; buffers are page-aligned either way.
    ``close`` may be called while reads are running: the descriptor is closed when the last read
    ends, so it is never reused under a running read.
    """

    def __init__(self, manifest: Manifest, fd: int, direct: bool, counters: Counters) -> None:
        self.manifest = manifest
        self.direct = direct
        self._fd = fd
        self._counters = counters
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting reads; the descriptor closes now or when the last running read ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                return
        os.close(self._fd)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[int]:
        """The open data file's descriptor, kept open (even if closed meanwhile) until the block ends.

        For reads made elsewhere through that descriptor (:mod:`.read_process`).
        """
        self._acquire()
        try:
            yield self._fd
        finally:
            self._release()

    def check(self, region: str, indices: Sequence[int]) -> RegionLayout:
        """The region's layout, after checking the name and every index (``InvalidArgument``)."""
        layout = self.manifest.region(region)
        for index in indices:
            layout.check_index(index)
        return layout

    def read(self, region: str, indices: Sequence[int]) -> list[bytes]:
        """Payloads of ``indices`` of ``region`` in the order given, each ``record_size`` bytes.

        A convenience over :meth:`read_verified` with a private buffer. Raises ``InvalidArgument``
        for an unknown region or an index out of range, ``DataLoss`` on a checksum mismatch.
        """
        layout = self.check(region, indices)
        if not indices:
            return []
        distinct = sorted(set(indices))
        with memoryview(mmap.mmap(-1, len(distinct) * layout.stride)) as buffer:
            views = self.read_verified(layout, distinct, buffer)
            payloads = {index: bytes(view) for index, view in views.items()}
        return [payloads[index] for index in indices]

    def read_verified(self, layout: RegionLayout, indices: Sequence[int],
                      buffer: memoryview) -> dict[int, memoryview]:
        """Read distinct ``indices`` of ``layout`` into ``buffer``; views of their payloads.

        ``buffer`` is page-aligned and holds ``len(indices) * stride`` bytes. Adjacent indices are
        read with one system call. Every payload is checked against its CRC-32 (once, on the
        view); a mismatch raises ``DataLoss`` and counts in ``checksum_failures``. The views stay
        valid as long as ``buffer``'s memory does.
        """
        self._acquire()
        try:
            return self._read_checked(layout, indices, buffer)
        finally:
            self._release()

    def _read_checked(self, layout: RegionLayout, indices: Sequence[int],
                      buffer: memoryview) -> dict[int, memoryview]:
        runs = coalesce(indices)
        stride, size = layout.stride, layout.record_size
        where: dict[int, int] = {}
        position = 0
        started = time.perf_counter()
        for first, count in runs:
            self._read_exactly(buffer[position : position + count * stride],
                               layout.record_offset(first))
            for k in range(count):
                where[first + k] = position + k * stride
            position += count * stride
        self._counters.observe_read(time.perf_counter() - started)
        self._counters.add(bytes_read_from_disk=position, disk_reads=len(runs),
                           buffered_reads=0 if self.direct else len(runs))
        views = {}
        for index, start in where.items():
            payload = buffer[start : start + size]
            if crc32(payload) != self.manifest.checksum(layout.name, index):
                self._counters.add(checksum_failures=1)
                raise DataLoss(
                    f"checksum mismatch in object {self.manifest.key}, "
                    f"region {layout.name!r}, record {index}"
                )
            views[index] = payload
        return views

    def _read_exactly(self, part: memoryview, offset: int) -> None:
        done = 0
        while done < len(part):
            try:
                got = os.preadv(self._fd, [part[done:]], offset + done)
            except OSError as exc:  # EIO from the disk: INTERNAL, naming the object
                raise CacheError(f"reading the data file of object {self.manifest.key} at {offset + done} "
                                 f"failed: [Errno {exc.errno}] {exc.strerror}") from exc
            if got == 0:
                raise DataLoss(
                    f"data file of object {self.manifest.key} ends at {offset + done}, "
                    f"before the {len(part)} bytes at {offset} its manifest promises"
                )
            done += got

    def _acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise CacheError(f"reader of object {self.manifest.key} is closed")
            self._users += 1

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            close_now = self._closed and self._users == 0
        if close_now:
            os.close(self._fd)
