"""The record store: committed objects on disk, one data file and one manifest per object.

Writing goes through :class:`ObjectWriter` (temp data file, fsynced) and :meth:`RecordStore.commit`
(rename the data file, write the manifest to a temp file, fsync, rename, fsync the directory). The
manifest's rename is the commit point: a crash before it leaves only leftovers that the next start
removes; a crash after it leaves a whole object. Reading goes through :class:`ObjectReader`.

All methods block (file I/O); the gRPC layer calls them off the event loop. They are thread-safe:
one lock guards the index of committed objects, the byte accounting, and every change to the
directory tree (creating temp files, commit renames, deletes).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Sequence

from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.errors import FailedPrecondition, NotFound, ResourceExhausted
from contiguouskv.cache_server.keys import OBJECTS_DIR, TEMP_PREFIX, ObjectKey, check_layout
from contiguouskv.cache_server.keys import check_prefix_id, object_paths
from contiguouskv.cache_server.manifest import Manifest, data_size, plan_regions
from contiguouskv.cache_server.reader import ObjectReader
from contiguouskv.cache_server.recovery import fsync_dir, recover
from contiguouskv.cache_server.stats import Counters, StatsSnapshot
from contiguouskv.cache_server.writer import ObjectWriter, disk_full_error, is_disk_full

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CommitResult:
    """Outcome of a commit: the visible manifest, and whether it was there before this put."""

    manifest: Manifest
    already_committed: bool
    bytes_written: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeleteResult:
    """What a delete removed: number of objects (layouts) and data-file bytes."""

    layouts_deleted: int
    bytes_freed: int
    keys: tuple[ObjectKey, ...] = ()


class RecordStore:
    """Committed objects under ``config.root``; cleans crash leftovers on construction."""

    def __init__(self, config: CacheServerConfig) -> None:
        self.config = config
        self.counters = Counters()
        self._root = config.root
        self._lock = threading.Lock()
        objects_dir = self._root / OBJECTS_DIR
        objects_dir.mkdir(parents=True, exist_ok=True)
        self._index = recover(self._root, objects_dir)
        self._stored_bytes = sum(m.data_bytes for m in self._index.values())
        self._reserved: dict[ObjectWriter, int] = {}  # bytes promised to unfinished writers
        self._direct_io = config.direct_io and self._probe_direct_io()

    @property
    def direct_io(self) -> bool:
        """Whether data files are read with O_DIRECT (false when asked not to or unsupported)."""
        return self._direct_io

    # -- writing ----------------------------------------------------------------------------

    def begin_put(
        self, key: ObjectKey, regions: Iterable[tuple[str, int, int]], metadata: bytes
    ) -> ObjectWriter:
        """Start writing ``key`` with regions ``(name, num_records, record_size)``.

        If ``key`` is committed with the same regions, the writer only checks what it is fed and
        the commit reports ``already_committed``; with other regions, ``FailedPrecondition``.
        Raises ``InvalidArgument`` for bad regions, ``ResourceExhausted`` when the object would
        pass ``max_store_bytes`` or the disk is full.
        """
        layouts = plan_regions(regions, self.config.max_record_bytes)
        size = data_size(layouts)
        paths = object_paths(self._root, key)
        with self._lock:
            existing = self._index.get(key)
            if existing is not None:
                if not existing.same_regions(layouts):
                    raise FailedPrecondition(f"object {key} is already stored with other regions")
                return ObjectWriter(key, layouts, metadata, temp_path=None, fd=None)
            self._check_room(key, size)
            temp = paths.temp_for(paths.data)
            try:
                paths.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full_error(key, exc) from exc
                raise
            writer = ObjectWriter(key, layouts, metadata, temp_path=temp, fd=fd)
            self._reserved[writer] = size
        try:
            writer.preallocate()
        except BaseException:
            self.abort(writer)
            raise
        return writer

    def _check_room(self, key: ObjectKey, size: int) -> None:
        # Called with the lock held, before anything is allocated for the object.
        limit = self.config.max_store_bytes
        reserved = sum(self._reserved.values())
        if limit and self._stored_bytes + reserved + size > limit:
            raise ResourceExhausted(
                f"object {key} needs {size} bytes; the store holds {self._stored_bytes} "
                f"(+{reserved} being written) of max_store_bytes {limit}"
            )
        disk = os.statvfs(self._root)
        free = disk.f_bavail * disk.f_frsize
        if disk.f_blocks and size > free:  # f_blocks 0: no size accounting (ramfs)
            raise ResourceExhausted(f"object {key} needs {size} bytes; the disk has {free} free")

    def commit(self, writer: ObjectWriter) -> CommitResult:
        """Make ``writer``'s object durable and visible, or report the one already there.

        On any error the writer's files are removed and nothing becomes visible. Errors:
        ``InvalidArgument`` (records missing), ``ResourceExhausted`` (disk full).
        """
        try:
            manifest = writer.finish()
            with self._lock:
                existing = self._index.get(writer.key)
                if existing is not None:
                    return CommitResult(existing, already_committed=True, bytes_written=0)
                if writer.discard:
                    raise FailedPrecondition(f"object {writer.key} was deleted during this put")
                self._publish(writer, manifest)
                self._index[writer.key] = manifest
                self._stored_bytes += manifest.data_bytes
        finally:
            self.abort(writer)
        logger.info("committed %s: %d bytes", writer.key, manifest.data_bytes)
        return CommitResult(manifest, already_committed=False, bytes_written=writer.bytes_written)

    def abort(self, writer: ObjectWriter) -> None:
        """Drop an unfinished writer: remove its temp file and release its reserved bytes.

        Safe after a commit and when called twice (it then does nothing).
        """
        writer.discard_files()
        with self._lock:
            self._reserved.pop(writer, None)

    def _publish(self, writer: ObjectWriter, manifest: Manifest) -> None:
        # Called with the lock held; the manifest's rename is the commit point.
        temp_data = writer.temp_path
        assert temp_data is not None, "a discarding writer has nothing to publish"
        paths = object_paths(self._root, writer.key)
        temp_manifest = paths.temp_for(paths.manifest)
        try:
            os.rename(temp_data, paths.data)
            with open(temp_manifest, "xb") as out:
                out.write(manifest.to_json())
                out.flush()
                os.fsync(out.fileno())
            os.rename(temp_manifest, paths.manifest)
            fsync_dir(paths.directory)
        except OSError as exc:
            temp_manifest.unlink(missing_ok=True)
            if not paths.manifest.exists():
                paths.data.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(writer.key, exc) from exc
            raise

    # -- reading ----------------------------------------------------------------------------

    def manifest(self, key: ObjectKey) -> Manifest:
        """The manifest of committed ``key``; ``NotFound`` if there is none."""
        with self._lock:
            manifest = self._index.get(key)
        if manifest is None:
            raise NotFound(f"object {key} is not stored")
        return manifest

    def open_object(self, key: ObjectKey) -> ObjectReader:
        """A reader holding ``key``'s data file open (``NotFound`` if not committed).

        The caller closes it (it is a context manager). A delete while it is open does not
        disturb it.
        """
        with self._lock:
            manifest = self._index.get(key)
            if manifest is None:
                raise NotFound(f"object {key} is not stored")
            fd, direct = self._open_data(object_paths(self._root, key).data)
        return ObjectReader(manifest, fd, direct, self.counters)

    def read_records(self, key: ObjectKey, region: str, indices: Sequence[int]) -> list[bytes]:
        """Payloads of records ``indices`` of ``region`` of ``key``, in the order given."""
        with self.open_object(key) as reader:
            return reader.read(region, indices)

    def _open_data(self, path: os.PathLike[str]) -> tuple[int, bool]:
        if self._direct_io:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_io = False
                logger.warning("O_DIRECT refused for %s; reading through the page cache", path)
        return os.open(path, os.O_RDONLY), False

    def _probe_direct_io(self) -> bool:
        probe = self._root / f"{TEMP_PREFIX}probe-direct-io"
        buffer = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            probe.write_bytes(bytes(mmap.PAGESIZE))
            fd = os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                os.preadv(fd, [buffer], 0)
            finally:
                os.close(fd)
        except (OSError, AttributeError) as exc:
            logger.warning("O_DIRECT unavailable under %s (%s); using buffered reads", self._root, exc)
            return False
        finally:
            buffer.close()
            probe.unlink(missing_ok=True)
        return hasattr(os, "O_DIRECT")

    # -- listing, deleting, stats ------------------------------------------------------------

    def list(self, prefix_id: str = "") -> list[Manifest]:
        """Manifests of committed objects (of ``prefix_id`` if given), sorted by key."""
        if prefix_id:
            check_prefix_id(prefix_id)
        with self._lock:
            found = [m for k, m in self._index.items() if not prefix_id or k.prefix_id == prefix_id]
        return sorted(found, key=lambda m: (m.key.prefix_id, m.key.layout))

    def delete(self, prefix_id: str, layout: str = "") -> DeleteResult:
        """Remove one layout of ``prefix_id`` (or all when ``layout`` is empty); absent is fine.

        Readers already open keep reading what they opened.
        """
        check_prefix_id(prefix_id)
        if layout:
            check_layout(layout)
        with self._lock:
            keys = [
                k for k in self._index
                if k.prefix_id == prefix_id and (not layout or k.layout == layout)
            ]
            freed = 0
            for key in keys:
                manifest = self._index.pop(key)
                self._stored_bytes -= manifest.data_bytes
                freed += manifest.data_bytes
                paths = object_paths(self._root, key)
                paths.manifest.unlink(missing_ok=True)
                paths.data.unlink(missing_ok=True)
            if keys:
                directory = object_paths(self._root, keys[0]).directory
                fsync_dir(directory)
                if not any(directory.iterdir()):
                    directory.rmdir()
        if keys:
            logger.info("deleted %d objects of prefix %s (%d bytes)", len(keys), prefix_id, freed)
        return DeleteResult(layouts_deleted=len(keys), bytes_freed=freed, keys=tuple(keys))

    def stats(self, cache: DramCache | None = None) -> StatsSnapshot:
        """Counters since start plus the current object count, stored bytes and ``cache``'s fill."""
        with self._lock:
            objects, stored = len(self._index), self._stored_bytes
        return StatsSnapshot(
            objects=objects, stored_bytes=stored, direct_io=self._direct_io,
            dram_bytes=cache.used_bytes if cache is not None else 0,
            dram_budget_bytes=cache.budget_bytes if cache is not None else 0,
            eviction_rule=cache.eviction_rule if cache is not None else "",
            values=self.counters.values(),
        )
