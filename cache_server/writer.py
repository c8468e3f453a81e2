"""Writing one object's data file: whole records, each exactly once, into a temp file.

An :class:`ObjectWriter` is made by :meth:`RecordStore.begin_put`, fed with :meth:`write`, and
ended by :meth:`RecordStore.commit` (which calls :meth:`finish` and publishes the object) or
:meth:`RecordStore.abort`. Until then nothing of it is visible. A writer for a key that is already
committed validates what it is fed but writes nothing (``discard``). One writer is used by one
caller at a time; :meth:`discard_files` may come from another thread (a cancelled call) and waits
for a running :meth:`write` or :meth:`finish`, so a descriptor is never closed under them.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from contiguouskv.common.checksum import crc32
from contiguouskv.cache_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.manifest import Manifest, RegionLayout, data_size, pack_checksums

logger = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
CRC_TYPECODE = "I"  # 4-byte unsigned on every platform CPython supports here


def is_disk_full(exc: OSError) -> bool:
    """Whether ``exc`` says the disk (or a quota) is full."""
    return exc.errno in DISK_FULL_ERRNOS


def disk_full_error(key: ObjectKey, exc: OSError) -> ResourceExhausted:
    """The error reported when writing ``key`` ran out of space."""
    return ResourceExhausted(f"disk full while writing object {key}: {exc.strerror}")


class ObjectWriter:
    """Accumulates the records of one object into ``temp_path`` (or nowhere when ``discard``).

    ``fd`` is open for writing on ``temp_path`` and owned by the writer; ``None`` when discarding.
    """

    def __init__(
        self,
        key: ObjectKey,
        regions: Mapping[str, RegionLayout],
        metadata: bytes,
        temp_path: Path | None,
        fd: int | None,
    ) -> None:
        self.key = key
        self.regions = regions
        self.metadata = metadata
        self.temp_path = temp_path
        self.bytes_written = 0
        self._fd = fd
        self._lock = threading.Lock()  # guards _fd, _ended and the bookkeeping below
        self._ended = False
        self._seen = {name: bytearray(r.num_records) for name, r in regions.items()}
        self._crcs = {
            name: array.array(CRC_TYPECODE, bytes(4 * r.num_records)) for name, r in regions.items()
        }

    @property
    def discard(self) -> bool:
        """True when the key was already committed: records are checked, not written."""
        return self.temp_path is None

    @property
    def size(self) -> int:
        """Size of the data file this writer builds (padding included)."""
        return data_size(self.regions)

    def preallocate(self) -> None:
        """Reserve the data file's blocks now, so a full disk fails early (``ResourceExhausted``)."""
        if self._fd is None or self.size == 0:
            return
        try:
            os.posix_fallocate(self._fd, 0, self.size)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.key, exc) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self._fd, self.size)

    def write(self, region: str, first_record: int, data: bytes) -> int:
        """Store consecutive whole records of ``region`` starting at ``first_record``.

        Raises ``InvalidArgument`` for an unknown region, a length that is not a positive multiple
        of the record size, records past the region's end, or a record already sent; and
        ``ResourceExhausted`` when the disk is full. Returns the bytes written to disk.
        """
        with self._lock:
            self._check_not_ended()
            return self._write(region, first_record, data)

    def _write(self, region: str, first_record: int, data: bytes) -> int:
        layout = self.regions.get(region)
        if layout is None:
            raise InvalidArgument(f"data.region: {region!r} is not in the header of {self.key}")
        size = layout.record_size
        if not data or len(data) % size:
            raise InvalidArgument(
                f"data.data: {len(data)} bytes is not a whole number of {size}-byte records "
                f"of region {region!r}"
            )
        count = len(data) // size
        if first_record + count > layout.num_records:
            raise InvalidArgument(
                f"data.first_record: records {first_record}..{first_record + count - 1} are past "
                f"the end of region {region!r} ({layout.num_records} records)"
            )
        seen = self._seen[region]
        again = seen.find(1, first_record, first_record + count)
        if again >= 0:
            raise InvalidArgument(f"data: record {again} of region {region!r} was sent twice")
        with memoryview(data) as view:
            crcs = array.array(
                CRC_TYPECODE, (crc32(view[i * size : (i + 1) * size]) for i in range(count))
            )
            written = self._write_padded(layout, first_record, view, count)
        seen[first_record : first_record + count] = b"\x01" * count
        self._crcs[region][first_record : first_record + count] = crcs
        self.bytes_written += written
        return written

    def _write_padded(self, layout: RegionLayout, first: int, view: memoryview, count: int) -> int:
        if self._fd is None:
            return 0
        size, stride = layout.record_size, layout.stride
        if size == stride:
            out: bytes | bytearray | memoryview = view
        else:
            out = bytearray(count * stride)
            for i in range(count):
                out[i * stride : i * stride + size] = view[i * size : (i + 1) * size]
        offset = layout.record_offset(first)
        try:
            with memoryview(out) as buffer:
                done = 0
                while done < len(buffer):
                    done += os.pwrite(self._fd, buffer[done:], offset + done)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.key, exc) from exc
            raise
        return len(out)

    def finish(self) -> Manifest:
        """Check that every record arrived, make the data durable, close it; return the manifest.

        Raises ``InvalidArgument`` naming the first missing record, ``ResourceExhausted`` when the
        flush hits a full disk. The caller (the store) publishes the result or aborts.
        """
        with self._lock:
            self._check_not_ended()
            self._check_complete()
            self._sync_and_close()
            self._ended = True
        return Manifest(
            key=self.key,
            regions=self.regions,
            checksums={name: pack_checksums(crcs) for name, crcs in self._crcs.items()},
            metadata=self.metadata,
            committed_at=time.time(),
        )

    def _check_not_ended(self) -> None:
        if self._ended:
            raise FailedPrecondition(f"the put of {self.key} has already ended")

    def _check_complete(self) -> None:
        for name, seen in self._seen.items():
            missing = seen.find(0)
            if missing >= 0:
                raise InvalidArgument(
                    f"commit: record {missing} of region {name!r} was never sent "
                    f"({seen.count(0)} of {len(seen)} missing)"
                )

    def _sync_and_close(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.key, exc) from exc
            raise
        self._close_fd()

    def discard_files(self) -> None:
        """End the writer, close and remove its temp file, if any; safe to call more than once."""
        with self._lock:
            self._ended = True
            self._close_fd()
        if self.temp_path is not None:
            try:
                self.temp_path.unlink(missing_ok=True)
            except OSError:
                logger.warning("cannot remove temp file %s", self.temp_path, exc_info=True)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
