"""Building one Fetch response: records from the DRAM cache, the rest read from disk, one copy.

:class:`BatchAssembler.build` runs on the read pool. It asks the DRAM cache for the records, reads
the missing ones (distinct, coalesced) into the thread's preallocated aligned buffer, verifies their
checksums, and joins cached and freshly read payloads into the serialized response (:mod:`.wire`)
with a single copy. Records read from disk are then offered to the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from contiguouskv.cache_server.buffers import ReadBuffers
from contiguouskv.cache_server.errors import CacheError, DataLoss
from contiguouskv.cache_server.dram_arena import Arena
from contiguouskv.cache_server.dram_cache import NO_PIN, DramCache, ObjectId, Payload, Pin
from contiguouskv.cache_server.manifest import RegionLayout
from contiguouskv.cache_server.read_process import ReadProcesses, ReadReport, Run
from contiguouskv.cache_server.reader import ObjectReader, coalesce
from contiguouskv.cache_server.stats import Counters
from contiguouskv.common.fetch_wire import (
    BytesLike, encode_arena_descriptor, encode_fetch_descriptor, encode_fetch_response,
)


LookedUp = tuple[list[Payload | None], Pin]
"""A DRAM lookup of a batch's records made ahead (:meth:`BatchAssembler.lookup`): payloads and pin."""


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """One Fetch response: records ``indices`` of ``region`` for request ``tag``.

    ``wire`` is the serialized ``FetchResponse``; its payload starts at ``data_offset``.
    """

    tag: int
    region: str
    indices: Sequence[int]
    wire: bytes
    data_offset: int
    done: bool
    cancelled: bool = False
    error_code: int = 0
    error_message: str = ""
    shm_bytes: int = 0  # payload bytes placed in a shared-memory slot (``wire`` is then a descriptor)

    @property
    def data(self) -> memoryview:
        """The concatenated payloads (a view into ``wire``; empty for a shared-memory batch)."""
        return memoryview(self.wire)[self.data_offset :]

    @property
    def payload_bytes(self) -> int:
        """Record payload bytes this batch delivers, in ``wire`` or in shared memory."""
        return self.shm_bytes or len(self.wire) - self.data_offset

    @classmethod
    def notice(cls, tag: int, region: str, cancelled: bool = False, error_code: int = 0,
               error_message: str = "") -> Batch:
        """A last batch without records: a cancel or an error of request ``tag``."""
        wire, offset = encode_fetch_response(tag, region, (), (), True, cancelled, error_code,
                                             error_message)
        return cls(tag, region, (), wire, offset, True, cancelled, error_code, error_message)


class BatchAssembler:
    """Builds batches of one open object from ``cache`` and ``reader``; thread-safe."""

    def __init__(self, reader: ObjectReader, cache: DramCache, buffers: ReadBuffers,
                 counters: Counters) -> None:
        self._reader = reader
        self._cache = cache
        self._buffers = buffers
        self._counters = counters
        manifest = reader.manifest
        self._object: ObjectId = (manifest.key, manifest.committed_at)

    def build(self, tag: int, layout: RegionLayout, indices: Sequence[int], done: bool,
              looked_up: LookedUp | None = None) -> Batch:
        """The batch of ``indices`` (already checked); raises ``DataLoss`` on a bad checksum.
        ``looked_up``: :meth:`lookup` of ``indices`` made by the caller, who releases its pin."""
        if looked_up is None:
            cached, pin = self.lookup(layout, indices)
        else:
            cached, pin = looked_up[0], NO_PIN  # its pin is the caller's to release
        try:
            missing = sorted({i for i, c in zip(indices, cached) if c is None})
            views = {}
            if missing:
                buffer = self._buffers.get(len(missing) * layout.stride)
                views = self._reader.read_verified(layout, missing, buffer)
            return self._assemble(tag, layout, indices, done, cached, missing, views)
        finally:
            pin.release()

    async def build_in_helper(self, helpers: ReadProcesses, tag: int, layout: RegionLayout,
                              indices: Sequence[int], done: bool, looked_up: LookedUp | None = None) -> Batch | None:
        """:meth:`build`, with the disk reads made by a helper process (:mod:`.read_process`).

        Runs on the event loop; ``None`` if no helper slot is free (then the caller uses
        :meth:`build` on its read pool). ``looked_up`` as for :meth:`build`.
        """
        region = layout.name
        stride, size = layout.stride, layout.record_size
        slot = helpers.acquire(len(indices) * stride)  # room for the worst case: nothing cached
        if slot is None:
            return None
        pin = NO_PIN
        try:
            if looked_up is None:
                cached, pin = self.lookup(layout, indices)
            else:
                cached = looked_up[0]  # its pin is the caller's to release
            missing = sorted({i for i, c in zip(indices, cached) if c is None})
            if not missing:
                return self._assemble(tag, layout, indices, done, cached, missing, {})
            runs, at = self._runs(layout, missing)
            buffer = helpers.view(slot, at)
            try:
                with self._reader.pinned() as fd:
                    report = await helpers.read(fd, slot, runs, stride, size)
            except OSError:  # no helper could take it: read in this process instead
                return None
            self._check_report(report, region, len(runs), at)
            if stride == size and missing == list(indices):  # the slot holds the payload as asked
                return self._assemble(tag, layout, indices, done, cached, missing, {}, buffer)
            views = {}
            position = 0
            for first, count in coalesce(missing):
                for index in range(first, first + count):
                    views[index] = buffer[position : position + size]
                    position += stride
            return self._assemble(tag, layout, indices, done, cached, missing, views)
        finally:
            helpers.release(slot)
            pin.release()

    def _check_report(self, report: ReadReport, region: str, runs: int, nbytes: int) -> None:
        """Count a helper's reads; raise ``DataLoss`` or ``CacheError`` for the failure it reports."""
        for seconds in report.seconds:
            self._counters.observe_read(seconds)
        self._counters.add(bytes_read_from_disk=nbytes, disk_reads=runs,
                           buffered_reads=0 if self._reader.direct else runs)
        if report.failure is not None:
            kind, message = report.failure
            manifest = self._reader.manifest
            if kind == "data_loss":
                self._counters.add(checksum_failures=1)
                raise DataLoss(f"checksum mismatch in object {manifest.key}, region {region!r}, "
                               f"record {report.bad_record}")
            if kind == "short":
                raise DataLoss(f"data file of object {manifest.key} {message} its manifest promises")
            raise CacheError(f"reading the data file of object {manifest.key} {message}")

    def _runs(self, layout: RegionLayout, indices: Sequence[int]) -> tuple[list[Run], int]:
        """The coalesced disk reads of distinct ascending ``indices``, back to back from offset 0."""
        runs, at = [], 0
        crcs = self._reader.manifest.checksums[layout.name]  # packed little-endian uint32, one per record
        for first, count in coalesce(indices):
            runs.append((layout.record_offset(first), count * layout.stride, at, first,
                         crcs[4 * first : 4 * (first + count)]))
            at += count * layout.stride
        return runs, at

    def direct_runs(self, layout: RegionLayout, indices: Sequence[int],
                    cached: Sequence[Payload | None]) -> list[Run] | None:
        """The reads that put ``indices`` where a shared-memory batch wants them (back to back, in
        order), when all come from disk, ascending, without padding; else ``None``."""
        if (layout.stride != layout.record_size or any(c is not None for c in cached)
                or not all(a < b for a, b in zip(indices, indices[1:]))):
            return None
        return self._runs(layout, indices)[0]

    def finish_into(self, tag: int, layout: RegionLayout, indices: Sequence[int], done: bool, dest: memoryview,
                    slot: int, runs: Sequence[Run], report: ReadReport) -> Batch:
        """The batch a helper read into ``dest`` by :meth:`direct_runs` (checked by the helper)."""
        self._check_report(report, layout.name, len(runs), len(indices) * layout.stride)
        size = layout.record_size
        views = {i: dest[k * size : (k + 1) * size] for k, i in enumerate(indices)}
        return self._described(tag, layout, indices, done, slot, [], sorted(views), views)

    def lookup(self, layout: RegionLayout, indices: Sequence[int]) -> tuple[list[Payload | None], Pin]:
        """The DRAM cache's payloads of ``indices`` (``None`` where it has none), counting the
        accesses, and the pin that keeps them valid until released."""
        return self._cache.lookup_pinned(self._object, layout.name, indices)

    def arena(self) -> Arena | None:
        """This object's DRAM arena, or ``None`` (no shared cache, or nothing of it cached yet)."""
        return self._cache.arena(self._object)

    def arena_batch(self, tag: int, layout: RegionLayout, indices: Sequence[int], done: bool,
                    arena: Arena, lease: int) -> Batch:
        """The batch of ``indices``, all in ``arena`` (this object's, from :meth:`arena`; looked up
        and pinned by the caller under ``lease``): a descriptor of their offsets, no copy."""
        size = layout.record_size
        self._counters.add(bytes_served_from_dram=len(indices) * size)
        wire = encode_arena_descriptor(tag, layout.name, indices, done, arena.number, lease,
                                       [layout.record_offset(i) for i in indices], size,
                                       self._crcs(layout, indices))
        return Batch(tag, layout.name, indices, wire, len(wire), done, shm_bytes=len(indices) * size)

    def _crcs(self, layout: RegionLayout, indices: Sequence[int]) -> bytes:
        """The manifest's CRC-32s of ``indices``, packed as a descriptor carries them."""
        crcs = self._reader.manifest.checksums[layout.name]  # packed little-endian uint32, one per record
        return b"".join(crcs[4 * i : 4 * i + 4] for i in indices)

    def _admit(self, layout: RegionLayout, missing: Sequence[int], views: dict[int, memoryview]) -> None:
        """Offer records just read (and checked) to the DRAM cache, at their file offsets."""
        self._cache.admit(self._object, layout.name, [(i, views[i]) for i in missing],
                          [layout.record_offset(i) for i in missing], self._reader.manifest.data_bytes)

    def build_into(self, tag: int, layout: RegionLayout, indices: Sequence[int], done: bool,
                   dest: memoryview, slot: int, cached: Sequence[Payload | None]) -> Batch:
        """The batch written into a client's shared-memory slot ``dest``, and its descriptor.

        ``cached`` is :meth:`lookup` of ``indices``, made by the caller. Records are placed back to back in the order asked. When all of them come from disk in
        ascending order and need no padding, they are read (O_DIRECT) straight into ``dest``;
        otherwise cached ones are copied from DRAM and missing ones read into the thread's buffer
        and copied. Disk reads are checked against their CRC-32 here, as for the byte path; the
        descriptor carries every record's CRC-32 for the client to check before use.
        """
        region, size, stride = layout.name, layout.record_size, layout.stride
        missing = sorted({i for i, c in zip(indices, cached) if c is None})
        in_place = (stride == size and len(missing) == len(indices)
                    and all(a < b for a, b in zip(indices, indices[1:])))
        if in_place:
            views = self._reader.read_verified(layout, missing, dest[: len(missing) * stride])
        else:
            views = (self._reader.read_verified(layout, missing, self._buffers.get(len(missing) * stride))
                     if missing else {})
            for k, (index, record) in enumerate(zip(indices, cached)):
                dest[k * size : (k + 1) * size] = record if record is not None else views[index]
        return self._described(tag, layout, indices, done, slot, cached, missing, views)

    def _described(self, tag: int, layout: RegionLayout, indices: Sequence[int], done: bool, slot: int,
                   cached: Sequence[Payload | None], missing: Sequence[int], views: dict[int, memoryview]) -> Batch:
        """Count, offer what came from disk to the DRAM cache, and describe the slot's batch."""
        region, size = layout.name, layout.record_size
        hits = sum(c is not None for c in cached)
        self._counters.add(bytes_served_from_dram=hits * size, bytes_requested_from_disk=len(missing) * size)
        if missing and self._cache.enabled:
            self._admit(layout, missing, views)
        wire = encode_fetch_descriptor(tag, region, indices, done, slot, len(indices) * size,
                                       self._crcs(layout, indices))
        return Batch(tag, region, indices, wire, len(wire), done, shm_bytes=len(indices) * size)

    def _assemble(self, tag: int, layout: RegionLayout, indices: Sequence[int], done: bool,
                  cached: Sequence[Payload | None], missing: Sequence[int],
                  views: dict[int, memoryview], payload: memoryview | None = None) -> Batch:
        """The response; records from ``cached``, ``views``, or all of them in order as ``payload``."""
        region = layout.name
        if payload is not None:
            pieces: Sequence[BytesLike] = [payload]
            size = layout.record_size
            if self._cache.enabled:
                views = {i: payload[k * size : (k + 1) * size] for k, i in enumerate(missing)}
        else:
            pieces = [c if c is not None else views[i] for i, c in zip(indices, cached)]
        wire, offset = encode_fetch_response(tag, region, indices, pieces, done)
        hits = sum(c is not None for c in cached)
        self._counters.add(bytes_served_from_dram=hits * layout.record_size,
                           bytes_requested_from_disk=len(missing) * layout.record_size)
        if missing and self._cache.enabled:
            self._admit(layout, missing, views)
        return Batch(tag, region, indices, wire, offset, done)
