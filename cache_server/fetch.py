"""One Fetch stream: a priority queue of record requests served as bounded batches.

A :class:`FetchSession` is fed by the stream's reader side (:meth:`submit`, :meth:`cancel`,
:meth:`close_input`, :meth:`fail`) and drained by its writer side (:meth:`responses`). Requests are
served in order of (priority ascending, arrival) among those pending when a batch is planned (a
batch already being read is not re-planned); each is cut into batches of consecutive records of
that request, in the order requested, holding at most ``max_batch_bytes`` of payload (at least one
record) and at most ``max_read_bytes`` of disk reads (records are padded to 4 KiB on disk, so tiny
records would otherwise make large reads). The last batch of a request has ``done``; a cancelled
request gets one batch with ``done`` and ``cancelled`` and no records instead of the rest.

Backpressure: :meth:`responses` starts at most ``read_ahead`` disk reads ahead of the batch it is
yielding, and yields only when the consumer asks for the next batch; a consumer that awaits each
gRPC write therefore bounds the memory of the stream.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import Executor

from contiguouskv.cache_server.errors import InvalidArgument
from contiguouskv.cache_server.keys import check_region_name
from contiguouskv.cache_server.manifest import RegionLayout
from contiguouskv.cache_server.reader import ObjectReader
from contiguouskv.cache_server.stats import Counters

READ_AHEAD = 2
DISK_BYTES_PER_PAYLOAD_BYTE = 4  # default cap of a batch's disk read, per byte of payload cap


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """One response: records ``indices`` of ``region`` for request ``tag``, payloads in ``data``."""

    tag: int
    region: str
    indices: Sequence[int]
    data: bytes
    done: bool
    cancelled: bool = False


@dataclasses.dataclass(slots=True, eq=False)
class _Request:
    tag: int
    region: RegionLayout
    indices: list[int]
    planned: int = 0  # indices[:planned] are in batches already started
    cancelled: bool = False


@dataclasses.dataclass(slots=True)
class _InFlight:
    request: _Request
    indices: list[int]
    done: bool
    data: asyncio.Future[bytes]


class FetchSession:
    """Serves record requests on one opened object; see the module docstring for the contract.

    ``reader`` is owned by the caller and must stay open until :meth:`responses` has finished.
    Blocking reads run on ``executor``.
    """

    def __init__(
        self,
        reader: ObjectReader,
        executor: Executor,
        counters: Counters,
        max_batch_bytes: int,
        max_read_bytes: int | None = None,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        self._reader = reader
        self._executor = executor
        self._counters = counters
        self._max_batch_bytes = max_batch_bytes
        self._max_read_bytes = max_read_bytes or DISK_BYTES_PER_PAYLOAD_BYTE * max_batch_bytes
        self._read_ahead = read_ahead
        self._queue: list[tuple[int, int, _Request]] = []  # heap of (priority, arrival, request)
        self._arrivals = 0
        self._active: dict[int, _Request] = {}  # tag -> request whose done batch is not out yet
        self._notices: collections.deque[Batch] = collections.deque()
        self._input_closed = False
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()
        counters.add(fetch_streams_total=1)

    def submit(self, tag: int, region: str, indices: Sequence[int], priority: int) -> None:
        """Queue a request; ``InvalidArgument`` for a tag in use, a bad region or index."""
        if tag in self._active:
            raise InvalidArgument(f"read.tag: {tag} is already used by a request not yet done")
        check_region_name(region)
        layout = self._reader.check(region, indices)
        request = _Request(tag, layout, list(indices))
        self._active[tag] = request
        heapq.heappush(self._queue, (priority, self._arrivals, request))
        self._arrivals += 1
        self._wakeup.set()

    def cancel(self, tags: Sequence[int]) -> None:
        """Drop the unserved rest of the requests with these tags; unknown or done tags are ignored."""
        for tag in tags:
            request = self._active.pop(tag, None)
            if request is not None:
                request.cancelled = True
                self._notices.append(Batch(tag, request.region.name, (), b"", True, True))
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
        """Batches in serving order; raises the error given to :meth:`fail` or met reading.

        Close it (``contextlib.aclosing``) to stop early: reads not yet started are cancelled.
        """
        in_flight: collections.deque[_InFlight] = collections.deque()
        try:
            while True:
                if self._error is not None:
                    raise self._error
                if self._notices:
                    yield self._notices.popleft()
                    continue
                self._start_reads(in_flight)
                if in_flight:
                    batch = await self._finish_read(in_flight.popleft())
                    if batch is not None:
                        yield batch
                    continue
                if self._input_closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        finally:
            for item in in_flight:
                item.data.cancel()

    def _start_reads(self, in_flight: collections.deque[_InFlight]) -> None:
        loop = asyncio.get_running_loop()
        while len(in_flight) < self._read_ahead and self._queue:
            request = self._queue[0][2]
            if request.cancelled:
                heapq.heappop(self._queue)
                continue
            start, stop = request.planned, self._batch_end(request)
            request.planned = stop
            done = stop == len(request.indices)
            if done:
                heapq.heappop(self._queue)
            indices = request.indices[start:stop]
            data = loop.run_in_executor(self._executor, self._read, request.region.name, indices)
            in_flight.append(_InFlight(request, indices, done, data))

    def _batch_end(self, request: _Request) -> int:
        size, stride = request.region.record_size, request.region.stride
        by_payload = self._max_batch_bytes // size
        by_disk = self._max_read_bytes // stride
        return min(len(request.indices), request.planned + max(1, min(by_payload, by_disk)))

    def _read(self, region: str, indices: list[int]) -> bytes:
        return b"".join(self._reader.read(region, indices))

    async def _finish_read(self, item: _InFlight) -> Batch | None:
        data = await item.data
        request = item.request
        if request.cancelled:
            return None  # its cancel notice went out instead
        if item.done:
            del self._active[request.tag]
        self._counters.add(bytes_served=len(data), records_served=len(item.indices))
        return Batch(request.tag, request.region.name, item.indices, data, item.done)

