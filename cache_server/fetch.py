"""One Fetch stream: a priority queue of record requests served as bounded batches.

A :class:`FetchSession` is fed by the stream's reader side (:meth:`submit`, :meth:`cancel`,
:meth:`close_input`, :meth:`fail`) and drained by its writer side (:meth:`responses`). Requests are
served in order of (priority ascending, arrival) among those pending when a batch is planned (a
batch already being read is not re-planned); each is cut into batches of consecutive records of
that request, in the order requested, holding at most ``max_batch_bytes`` of payload (at least one
record) and at most ``max_read_bytes`` of disk reads (records are padded to 4 KiB on disk, so tiny
records would otherwise make large reads). The last batch of a request has ``done``; a cancelled
request gets one batch with ``done`` and ``cancelled`` and no records instead of the rest; a
request whose records cannot be read (a checksum mismatch: DATA_LOSS) gets one batch with ``done``
and ``error_code`` instead of the rest, and the stream goes on with the other requests.

Several batches are read at once, so the disk sees a deep queue: by the helper processes when the
session has them (:mod:`.read_process`; a batch goes to the read pool when no helper slot is free),
else on the read pool (each batch one task, its coalesced runs read back to back). Backpressure:
the payload bytes of batches being read plus the batch last yielded stay within
``max_inflight_bytes`` (one batch at least), and :meth:`responses` yields only when its consumer
asks for the next batch; a consumer that awaits each gRPC write (which waits on HTTP/2 flow
control) therefore bounds the stream's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import concurrent.futures
import dataclasses
import heapq
import logging
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import Executor

from contiguouskv.cache_server.assemble import Batch, BatchAssembler, LookedUp
from contiguouskv.cache_server.dram_arena import Arena
from contiguouskv.cache_server.dram_cache import Payload, Pin
from contiguouskv.cache_server.errors import CacheError, InvalidArgument
from contiguouskv.cache_server.keys import check_region_name
from contiguouskv.cache_server.manifest import RegionLayout
from contiguouskv.cache_server.read_process import ReadProcesses, ReadReport, Run
from contiguouskv.cache_server.reader import ObjectReader
from contiguouskv.cache_server.shm_plane import PlaneStream
from contiguouskv.cache_server.stats import Counters
from contiguouskv.common import telemetry

tracer = telemetry.Tracer("contiguouskv.cache")

MAX_BATCHES_IN_FLIGHT = 32
DEFAULT_INFLIGHT_BYTES = 16 << 20
DISK_BYTES_PER_PAYLOAD_BYTE = 4  # default cap of a batch's disk read, per byte of payload cap
MAX_INDICES_PER_READ = 1 << 20
MAX_PENDING_INDICES = 1 << 22  # per stream, over requests not yet done
log = logging.getLogger(__name__)

INTERNAL = 13


@dataclasses.dataclass(slots=True, eq=False)
class _StreamRead:
    tag: int
    region: RegionLayout
    indices: list[int]
    planned: int = 0  # indices[:planned] are in batches already started
    ended: bool = False  # cancelled or failed: nothing more is sent for it


@dataclasses.dataclass(slots=True)
class _InFlight:
    request: _StreamRead
    count: int
    nbytes: int
    done: bool
    batch: asyncio.Future[Batch]
    slot: int | None = None  # the shared-memory slot being written (plane streams)
    lease: int | None = None  # the plane's lease on DRAM hits read in place (plane streams)
    # what writes the slot: a read-pool thread, or a helper's read (done when its answer came)
    work: concurrent.futures.Future[Batch] | asyncio.Future[ReadReport] | None = None


class FetchSession:
    """Serves record requests on one opened object; see the module docstring for the contract.

    ``assembler`` builds batches from the object's reader (owned by the caller, open until
    :meth:`responses` has finished) and the DRAM cache; its blocking work runs on ``executor``,
    its disk reads in ``helpers`` when given.
    """

    def __init__(
        self,
        reader: ObjectReader,
        assembler: BatchAssembler,
        executor: Executor,
        counters: Counters,
        max_batch_bytes: int,
        max_read_bytes: int | None = None,
        max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
        max_batches: int = MAX_BATCHES_IN_FLIGHT,
        helpers: ReadProcesses | None = None,
        plane: PlaneStream | None = None,
    ) -> None:
        self._reader = reader
        self._assembler = assembler
        self._executor = executor
        self._counters = counters
        self._max_batch_bytes = max_batch_bytes
        self._max_read_bytes = max_read_bytes or DISK_BYTES_PER_PAYLOAD_BYTE * max_batch_bytes
        self._max_inflight_bytes = max_inflight_bytes
        self._max_batches = max_batches
        self._helpers = helpers
        self._plane = plane
        if plane is not None:  # each batch fills one slot of the client's buffer
            self._max_batch_bytes = min(max_batch_bytes, plane.slot_bytes)
        self._queue: list[tuple[int, int, _StreamRead]] = []  # heap of (priority, arrival, request)
        self._arrivals = 0
        self._active: dict[int, _StreamRead] = {}  # tag -> request whose done batch is not out yet
        self._pending_indices = 0
        self._notices: collections.deque[Batch] = collections.deque()
        self._held = 0  # payload bytes of batches started and not yet taken by the consumer
        self._input_closed = False
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()
        self._span = telemetry.NOOP_SPAN  # "serve fetch", while responses() runs
        counters.add(fetch_streams_total=1)

    def submit(self, tag: int, region: str, indices: Sequence[int], priority: int) -> None:
        """Queue a request; ``InvalidArgument`` for a tag in use, a bad region or index, too many."""
        if tag in self._active:
            raise InvalidArgument(f"read.tag: {tag} is already used by a request not yet done")
        if len(indices) > MAX_INDICES_PER_READ:
            raise InvalidArgument(
                f"read.indices: {len(indices)} indices in one read, more than {MAX_INDICES_PER_READ}")
        if self._pending_indices + len(indices) > MAX_PENDING_INDICES:
            raise InvalidArgument(
                f"read.indices: more than {MAX_PENDING_INDICES} indices pending on one stream")
        check_region_name(region)
        layout = self._reader.manifest.region(region)
        if indices:
            layout.check_index(min(indices))
            layout.check_index(max(indices))
        request = _StreamRead(tag, layout, list(indices))
        self._active[tag] = request
        self._pending_indices += len(indices)
        heapq.heappush(self._queue, (priority, self._arrivals, request))
        self._arrivals += 1
        self._counters.add(records_requested=len(indices),
                           bytes_requested=len(indices) * layout.record_size)
        self._wakeup.set()

    def cancel(self, tags: Sequence[int]) -> None:
        """Drop the unserved rest of the requests with these tags; unknown or done tags are ignored."""
        for tag in tags:
            request = self._active.get(tag)
            if request is not None:
                self._end(request)
                self._notices.append(Batch.notice(tag, request.region.name, cancelled=True))
        self._wakeup.set()

    def close_input(self) -> None:
        """No more requests will come: :meth:`responses` ends once every request is served."""
        self._input_closed = True
        self._wakeup.set()

    def fail(self, error: BaseException) -> None:
        """End :meth:`responses` by raising ``error`` at its next step."""
        self._error = error
        self._wakeup.set()

    async def responses(self) -> AsyncGenerator[Batch, None]:
        """Batches in serving order; raises the error given to :meth:`fail`.

        Close it (``contextlib.aclosing``) to stop early: reads not yet started are cancelled.
        """
        in_flight: collections.deque[_InFlight] = collections.deque()
        key = self._reader.manifest.key
        self._span = tracer.start(telemetry.SPAN_SERVE_FETCH, {
            telemetry.ATTR_PREFIX_ID: key.prefix_id, telemetry.ATTR_LAYOUT: key.layout})
        self._counters.add(inflight_streams=1)
        try:
            while True:
                if self._error is not None:
                    raise self._error
                if self._notices:
                    yield self._notices.popleft()
                    continue
                self._start_reads(in_flight)
                if in_flight:
                    item = in_flight.popleft()
                    batch = await self._finish_read(item)
                    if batch is not None:
                        yield batch
                    self._release(item.nbytes)
                    continue
                if self._input_closed and not self._queue:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        finally:
            for item in in_flight:
                item.batch.cancel()
                self._drop_slot_when_written(item)
            self._release(self._held)
            self._counters.add(inflight_streams=-1)
            self._span.end()

    def _start_reads(self, in_flight: collections.deque[_InFlight]) -> None:
        loop = asyncio.get_running_loop()
        while len(in_flight) < self._max_batches and self._queue:
            request = self._queue[0][2]
            if request.ended:
                heapq.heappop(self._queue)
                continue
            start, stop = request.planned, self._batch_end(request)
            nbytes = (stop - start) * request.region.record_size
            if in_flight and self._held + nbytes > self._max_inflight_bytes:
                return
            request.planned = stop
            done = stop == len(request.indices)
            if done:
                heapq.heappop(self._queue)
            self._held += nbytes
            self._counters.add(inflight_bytes=nbytes)
            indices = request.indices[start:stop]
            if self._plane is not None and self._plane.usable:
                cached, pin = self._assembler.lookup(request.region, indices)
                if pin.records == len(indices) and (arena := self._assembler.arena()) is not None \
                        and self._plane.share(arena):  # all in the arena: read in place, no slot
                    in_flight.append(self._in_place(request, indices, nbytes, done, arena, pin))
                    continue
                # Every slot written or held by the client: this batch goes as bytes (waiting for
                # a release could wait forever, the client holding slots until records still to come)
                slot = self._plane.take()
                if slot is not None:
                    in_flight.append(self._start_into(request, indices, nbytes, done, slot, cached, pin))
                    continue
                looked_up: LookedUp | None = (cached, pin)  # the byte path uses this lookup: counted once
            else:
                looked_up = None
            future: asyncio.Future[Batch] = (
                asyncio.ensure_future(self._build_helped(request, indices, done, looked_up))
                if self._helpers is not None
                else loop.run_in_executor(self._executor, self._build, request, indices, done, looked_up))
            in_flight.append(_InFlight(request, len(indices), nbytes, done, future))

    def _in_place(self, request: _StreamRead, indices: list[int], nbytes: int, done: bool, arena: Arena,
                  pin: Pin) -> _InFlight:
        """A batch wholly in the DRAM cache's arena, which the client maps: a descriptor of the
        records' offsets under a new lease holding ``pin``; nothing is copied."""
        assert self._plane is not None
        lease = self._plane.lend(pin)
        ready: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        ready.set_result(self._assembler.arena_batch(request.tag, request.region, indices, done, arena, lease))
        return _InFlight(request, len(indices), nbytes, done, ready, lease=lease)

    def _start_into(self, request: _StreamRead, indices: list[int], nbytes: int, done: bool,
                    slot: int, cached: list[Payload | None], pin: Pin) -> _InFlight:
        """Start filling shared-memory ``slot`` with ``indices`` (``cached``: their DRAM hits, held
        by ``pin`` until copied): on the event loop when every record is in DRAM (no thread hop),
        by a read helper when all come straight from disk, else on the read pool."""
        loop = asyncio.get_running_loop()
        if all(record is not None for record in cached):
            ready: asyncio.Future[Batch] = loop.create_future()
            try:
                ready.set_result(self._build_into(request, indices, done, slot, cached))
            except Exception as exc:  # noqa: BLE001 - reported by _finish_read, as from a thread
                ready.set_exception(exc)
            finally:
                pin.release()
            return _InFlight(request, len(indices), nbytes, done, ready, slot)
        runs = self._assembler.direct_runs(request.region, indices, cached) if self._helpers else None
        if runs is not None:  # nothing cached, so nothing pinned
            item = _InFlight(request, len(indices), nbytes, done, loop.create_future(), slot)
            item.batch = asyncio.ensure_future(self._build_into_helped(item, indices, runs, cached))
            return item
        work = self._executor.submit(self._build_into, request, indices, done, slot, cached)
        work.add_done_callback(lambda _: pin.release())  # the hits are copied (or never will be)
        return _InFlight(request, len(indices), nbytes, done, asyncio.wrap_future(work), slot, work)

    def _batch_end(self, request: _StreamRead) -> int:
        size, stride = request.region.record_size, request.region.stride
        by_payload = self._max_batch_bytes // size
        by_disk = self._max_read_bytes // stride
        return min(len(request.indices), request.planned + max(1, min(by_payload, by_disk)))

    @contextlib.contextmanager
    def _reading(self, request: _StreamRead, count: int) -> Iterator[telemetry.Span]:
        """The ``read records`` span of one batch and the ``inflight_reads`` gauge around it."""
        span = tracer.start(telemetry.SPAN_READ_RECORDS, {
            telemetry.ATTR_REGION: request.region.name, telemetry.ATTR_RECORDS: count}, parent=self._span)
        self._counters.add(inflight_reads=1)
        try:
            yield span
        except Exception as exc:
            telemetry.mark_error(span, exc)
            raise
        finally:
            self._counters.add(inflight_reads=-1)
            span.end()

    def _build(self, request: _StreamRead, indices: list[int], done: bool,
               looked_up: LookedUp | None = None) -> Batch:
        """The batch as bytes (:meth:`BatchAssembler.build`), on the read pool; ``looked_up``: the
        DRAM lookup already made for it, whose pin this releases."""
        try:
            with self._reading(request, len(indices)) as span:
                batch = self._assembler.build(request.tag, request.region, indices, done, looked_up)
                span.set_attribute(telemetry.ATTR_BYTES, batch.payload_bytes)
                return batch
        finally:
            if looked_up is not None:
                looked_up[1].release()

    def _build_into(self, request: _StreamRead, indices: list[int], done: bool, slot: int,
                    cached: list[Payload | None]) -> Batch:
        """The batch written into shared-memory ``slot`` (:meth:`BatchAssembler.build_into`): on the read
        pool when records must come from disk, on the event loop when ``cached`` holds them all."""
        assert self._plane is not None
        with self._reading(request, len(indices)) as span:
            dest = self._plane.view(slot, len(indices) * request.region.record_size)
            batch = self._assembler.build_into(request.tag, request.region, indices, done, dest, slot, cached)
            span.set_attribute(telemetry.ATTR_BYTES, batch.payload_bytes)
            return batch

    async def _build_into_helped(self, item: _InFlight, indices: list[int], runs: list[Run],
                                 cached: list[Payload | None]) -> Batch:
        """The batch a read helper reads into ``item``'s slot (O_DIRECT, CRC-checked by the helper), or
        a read-pool thread when no helper could take it."""
        assert self._plane is not None and self._helpers is not None and item.slot is not None
        request, slot, layout = item.request, item.slot, item.request.region
        with self._reading(request, len(indices)) as span:
            with self._reader.pinned() as fd:
                try:
                    item.work = self._helpers.read_into(self._plane.key, self._plane.offset(slot), fd, runs,
                                                        layout.stride, layout.record_size)
                except OSError:
                    item.work = None
                report = await asyncio.shield(item.work) if item.work is not None else None
            if report is not None:
                dest = self._plane.view(slot, len(indices) * layout.record_size)
                batch = self._assembler.finish_into(request.tag, layout, indices, item.done, dest, slot, runs,
                                                    report)
                span.set_attribute(telemetry.ATTR_BYTES, batch.payload_bytes)
                return batch
        work = self._executor.submit(self._build_into, request, indices, item.done, slot, cached)
        item.work = work
        return await asyncio.wrap_future(work)

    def _drop_slot_when_written(self, item: _InFlight) -> None:
        """Free ``item``'s slot (or lease), unsent, once no thread writes it any more."""
        if item.lease is not None and self._plane is not None:
            self._plane.drop_lease(item.lease)
        if item.slot is None or self._plane is None:
            return
        plane, slot, loop = self._plane, item.slot, asyncio.get_running_loop()
        if item.work is None or item.work.done():
            plane.drop(slot)
            return
        if isinstance(item.work, asyncio.Future):  # a helper's read: its answer comes on this loop
            item.work.add_done_callback(lambda _: plane.drop(slot))
            return

        def written(_: object) -> None:
            try:
                loop.call_soon_threadsafe(plane.drop, slot)
            except RuntimeError:  # the loop is gone, and the plane with it
                pass
        item.work.add_done_callback(written)

    async def _build_helped(self, request: _StreamRead, indices: list[int], done: bool,
                            looked_up: LookedUp | None = None) -> Batch:
        """The batch, read by a helper process, or on the read pool when no helper slot is free;
        ``looked_up`` as for :meth:`_build` (its pin released here, or by :meth:`_build`)."""
        assert self._helpers is not None
        handed = False
        try:
            with self._reading(request, len(indices)) as span:
                batch = await self._assembler.build_in_helper(self._helpers, request.tag, request.region, indices,
                                                              done, looked_up)
                if batch is not None:
                    span.set_attribute(telemetry.ATTR_BYTES, batch.payload_bytes)
                    return batch
            loop = asyncio.get_running_loop()
            handed = True  # the read-pool thread releases the pin when it has copied the hits
            return await loop.run_in_executor(self._executor, self._build, request, indices, done, looked_up)
        finally:
            if looked_up is not None and not handed:
                looked_up[1].release()

    async def _finish_read(self, item: _InFlight) -> Batch | None:
        request = item.request
        try:
            batch = await item.batch
        except (CacheError, OSError) as exc:
            self._drop_slot_when_written(item)
            if request.ended:
                return None
            self._end(request)
            self._counters.add(fetch_requests_failed=1)
            code = exc.code if isinstance(exc, CacheError) else INTERNAL
            # the stream goes on (the read fails alone, in its notice); the operator's line is here
            log.warning("Fetch read failed: %s %s", type(exc).__name__, exc)
            return Batch.notice(request.tag, request.region.name, error_code=code,
                                error_message=str(exc))
        if request.ended:
            self._drop_slot_when_written(item)
            return None  # its cancel or error notice went out instead
        if item.slot is not None:
            assert self._plane is not None
            if not self._plane.sent(item.slot):  # the client ended the stream: nobody reads it
                return None
            self._counters.add(bytes_served_shm=batch.payload_bytes)
        elif item.lease is not None:
            assert self._plane is not None
            if not self._plane.sent_lease(item.lease):  # the client ended the stream: nobody reads it
                return None
            self._counters.add(bytes_served_shm=batch.payload_bytes, bytes_served_in_place=batch.payload_bytes)
        if item.done:
            self._end(request)
        self._counters.add(bytes_served=batch.payload_bytes, records_served=item.count)
        return batch

    def _end(self, request: _StreamRead) -> None:
        if self._active.pop(request.tag, None) is request:
            request.ended = True
            self._pending_indices -= len(request.indices)

    def _release(self, nbytes: int) -> None:
        self._held -= nbytes
        self._counters.add(inflight_bytes=-nbytes)
