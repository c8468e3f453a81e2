"""Moves one request's Fetch traffic: requests out in the order started, batches in, fail-over.

One writer task sends queued requests (queued from the event loop or from the compute thread);
the receiver hands every batch to the loader. When the stream breaks (or a read fails in-band with a
code another replica may not share) and the stream can fail over
(:class:`~..cachenet.failover.ReplicaStream`), the pump opens the next replica and sends again,
under the same tags, the records still missing of every unfinished read (:class:`~.ledger.ReadLedger`);
records already received stay. Any other end of the stream is reported once through ``on_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from contiguouskv.common.fetch_wire import FetchBatch
from contiguouskv.compute_server.cachenet.record_stream import FetchStream, ReadSpec
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.kvio.ledger import ReadLedger

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ReadRequest:
    tag: int
    region: str
    indices: list[int]
    priority: int


@dataclass(frozen=True)
class _CancelRequest:
    tags: list[int]


class FetchPump:
    """Sends and receives on one :class:`FetchStream`; ``on_batch`` files records, ``on_error`` ends waits."""

    def __init__(self, stream: FetchStream, loop: asyncio.AbstractEventLoop, on_batch: Callable[[FetchBatch], None],
                 on_error: Callable[[BaseException], None],
                 has_room: Callable[[], bool] = lambda: True) -> None:
        self._stream = stream
        self._has_room = has_room
        self._room = asyncio.Event()
        self._loop = loop
        self._on_batch = on_batch
        self._on_error = on_error
        self._outbox: asyncio.Queue[_ReadRequest | _CancelRequest] = asyncio.Queue()
        self._ledger = ReadLedger()
        self.failovers: list[str] = []  # "from -> to" per fail-over
        self.first_request_at: float | None = None
        self.last_arrival_at: float | None = None

    # --- any thread ------------------------------------------------------------------------------
    def send_read(self, tag: int, region: str, indices: Sequence[int], priority: int) -> None:
        self._post(_ReadRequest(tag, region, list(indices), priority))

    def send_reads(self, reads: Sequence[tuple[int, str, Sequence[int], int]]) -> None:
        """Several ``(tag, region, indices, priority)`` reads, in order, with one wake-up of the event
        loop (a prediction is one read per chunk and sub-period: hundreds at a time)."""
        items = [_ReadRequest(tag, region, list(indices), priority) for tag, region, indices, priority in reads]
        if not items:
            return
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        self._loop.call_soon_threadsafe(self._enqueue, items)

    def _enqueue(self, items: list[_ReadRequest]) -> None:
        for item in items:
            self._outbox.put_nowait(item)

    def send_cancel(self, tags: Sequence[int]) -> None:
        if tags:
            self._post(_CancelRequest(list(tags)))

    def _post(self, item: _ReadRequest | _CancelRequest) -> None:
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, item)

    # --- event loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Send and receive until cancelled or the stream cannot go on (then ``on_error`` once)."""
        while True:
            writer = asyncio.create_task(self._write_loop())
            try:
                error = await self._receive()
            finally:
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if not await self._failover(error):
                self._on_error(self._stream.exhausted(error))
                return

    async def _receive(self) -> ComputeError:
        """Receive until the stream breaks; returns why."""
        try:
            async with contextlib.aclosing(self._stream.responses()) as batches:
                while True:
                    await self._wait_for_room()
                    batch = await anext(batches, None)
                    if batch is None:
                        break
                    error = self._on_message(batch)
                    if error is not None:
                        return error
            return ComputeError(f"cache server {self._stream.address}: fetch stream ended", code="UNAVAILABLE")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure must wake the compute thread
            return exc if isinstance(exc, ComputeError) else ComputeError(f"fetch stream failed: {exc!r}")

    def room_made(self) -> None:
        """Any thread: the loader may take more (records released, or someone waits)."""
        self._loop.call_soon_threadsafe(self._room.set)

    async def _wait_for_room(self) -> None:
        """Back-pressure: read the next batch only while the loader has room for it; unread batches
        stay in gRPC's flow-control window and then on the cache server."""
        while not self._has_room():
            self._room.clear()
            if self._has_room():  # released between the check and the clear
                return
            await self._room.wait()

    def _on_message(self, batch: FetchBatch) -> ComputeError | None:
        """File one batch; returns an in-band error to fail over on, else None."""
        if batch.error_code:
            code = STATUS_NAMES.get(batch.error_code, "INTERNAL")
            error = ComputeError(f"cache server {self._stream.address}: {batch.error_message}", code=code)
            if self._stream.can_fail_over(error):
                return error
            self._on_error(error)
            return None
        self._ledger.arrived(batch.tag, len(batch.indices), batch.done)
        self.last_arrival_at = time.perf_counter()
        self._on_batch(batch)
        return None

    async def _failover(self, error: ComputeError) -> bool:
        """Open the next replica and send again what is missing of every unfinished read."""
        if not self._stream.can_fail_over(error):
            return False
        broken = self._stream.address
        if not await self._stream.failover(error):
            return False
        self.failovers.append(f"{broken} -> {self._stream.address}")
        reads = self._ledger.replay()
        log.warning("fetch stream from %s broke (%s): %d unfinished reads (%d records) go to %s",
                    broken, error, len(reads), sum(r.missing for _, r in reads), self._stream.address)
        for tag, read in reads:
            try:
                await self._stream.read(tag, read.region, read.indices, read.priority)
            except ComputeError:
                break  # this stream broke too: the receiver sees it and fails over again
        return True

    async def _write_loop(self) -> None:
        """Send the outbox in order. Reads queued together go in one message (``read_many``): a
        prediction is one read per chunk and sub-period, hundreds at once, and each write to a
        gRPC stream costs the event loop far more than the bytes it carries."""
        try:
            while True:
                items = [await self._outbox.get()]
                while not self._outbox.empty():
                    items.append(self._outbox.get_nowait())
                # Into the ledger first, all of them: should a write below break the stream, the
                # fail-over sends again every read taken from the outbox here (and no cancelled one).
                for item in items:
                    if isinstance(item, _ReadRequest):
                        self._ledger.sent(item.tag, item.region, item.indices, item.priority)
                    else:
                        self._ledger.cancelled(item.tags)
                reads: list[ReadSpec] = []
                for item in items:
                    if isinstance(item, _ReadRequest):
                        reads.append((item.tag, item.region, item.indices, item.priority))
                        continue
                    if reads:  # a cancel goes after the reads queued before it
                        await self._stream.read_many(reads)
                        reads = []
                    await self._stream.cancel(item.tags)
                if reads:
                    await self._stream.read_many(reads)
        except ComputeError as exc:
            if not self._stream.can_fail_over(exc):
                self._on_error(exc)
            # else the receiver sees the broken stream and fails over; the read is in the ledger
