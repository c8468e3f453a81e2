"""One request's Fetch traffic spread over several Fetch streams, and over the prefix's replicas.

One Fetch stream is one HTTP/2 stream served by one session on one shard, and tops out near
1.6 GB/s (docs/storage.md). :class:`MultiStream` is a :class:`~.record_stream.FetchStream` over
``N`` :class:`~.failover.ReplicaStream` substreams; substream ``k`` reads the prefix's replicas in
read order rotated by ``k``, so with ``R`` replicas the substreams start spread over all of them.

Routing. A read goes whole to one substream: the one with the fewest records asked on it and not
yet arrived (the first such on a tie). Its tag stays with that substream until the read's ``done``
batch; a cancel goes to the substreams that own its tags (a tag already done is dropped: nothing of
it is left to cancel). So the batches of one read arrive in order, on one stream, as
:class:`~..kvio.ledger.ReadLedger` needs. Priorities order reads within a substream only.

Merging. Each iteration of :meth:`MultiStream.responses` runs one task per substream that moves its
batches into a queue of ``N`` places (a substream's own batches stay in order; back-pressure: at
most about one batch per substream is read ahead of the consumer), and yields them as they come. The
first error of a substream, or its end (a Fetch stream never ends while it is used), is raised once
the batches before it were yielded. Closing the iterator cancels the tasks and waits for them; the
batches they held or had queued are dropped, their shared-memory leases (:mod:`.shm_plane`) released.

Fail-over. The pump closes the iterator, calls :meth:`MultiStream.failover` and then sends again,
under the same tags, every unfinished read (only what is missing of it). That is correct here
because after :meth:`failover` no call that carried a read of the request is still open:

- closing the iterator cancelled the drain tasks, and cancelling a task that waits in a gRPC read
  cancels the call; batches a task held or had queued were dropped, never handed to the pump. So a
  substream that did not fail may have lost batches, and may still be serving reads;
- hence :meth:`failover` ends every call: the substream that failed moves on to its next replica
  (:meth:`ReplicaStream.failover`, which counts it as that replica's failure), every other one is
  opened again on the replica it was on (not counted as a failure; if that one refuses now, on its
  next replica). The routes are cleared, and the re-sent reads are routed afresh.

Every tag the pump re-sends is therefore served by exactly one new call (never twice), and every
record the pump did not receive is missing in its ledger and so asked again (never lost). When the
substream that failed has no replica left, the MultiStream fails as one stream would; a substream
that merely cannot be opened again is dropped while another one goes on. Each fail-over uses up a
replica of the substream that failed, so fail-overs are bounded as on one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from contiguouskv.common.fetch_wire import FetchBatch
from contiguouskv.compute_server.cachenet.failover import Connect, ReplicaStream
from contiguouskv.compute_server.cachenet.record_stream import ReadSpec
from contiguouskv.compute_server.errors import ComputeError

log = logging.getLogger(__name__)


def rotated(replicas: Sequence[str], k: int) -> list[str]:
    """``replicas`` rotated left by ``k`` (modulo their number): substream ``k``'s read order."""
    if not replicas:
        return []
    k %= len(replicas)
    return [*replicas[k:], *replicas[:k]]


@dataclass
class _Route:
    """Where a read went: the substream (an index) and its records not yet arrived."""

    lane: int
    left: int


class MultiStream:
    """A :class:`~.record_stream.FetchStream` over several started substreams; see the module docstring.

    Built by :meth:`open`. All methods run on the event loop; :meth:`read`/:meth:`cancel` are not
    called while :meth:`failover` runs (the pump's writer is stopped during a fail-over).
    """

    def __init__(self, streams: Sequence[ReplicaStream]) -> None:
        if not streams:
            raise ValueError("MultiStream: needs at least one substream")
        self._streams = list(streams)
        self._routes: dict[int, _Route] = {}  # tag -> its substream, until its done batch
        self._load = [0] * len(self._streams)  # records asked and not arrived, per substream
        self._broken: ReplicaStream | None = None  # the substream whose error ended the last iteration

    @classmethod
    async def open(cls, prefix_id: str, layout: str, replicas: Sequence[str], connect: Connect, count: int,
                   on_failure: Callable[[str, ComputeError], None] | None = None) -> MultiStream:
        """Start ``count`` substreams of ``prefix_id``/``layout``, substream ``k`` over ``replicas``
        rotated by ``k``. Those that cannot be opened are left out (logged); the error of the first
        when none can."""
        streams = [ReplicaStream(prefix_id, layout, rotated(replicas, k), connect, on_failure) for k in range(count)]
        try:
            results = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
        except BaseException:
            await _close_all(streams)
            raise
        opened = [s for s, r in zip(streams, results) if r is None]
        errors = [r for r in results if isinstance(r, BaseException)]
        unexpected = [e for e in errors if not isinstance(e, ComputeError)]
        if unexpected or not opened:
            await _close_all(streams)
            raise (unexpected or errors)[0]
        if errors:
            log.warning("fetch of %s (%s): %d of %d streams opened (%s)", prefix_id, layout, len(opened), count,
                        errors[0])
        return cls(opened)

    @property
    def streams(self) -> list[ReplicaStream]:
        """The substreams in use (a copy)."""
        return list(self._streams)

    @property
    def address(self) -> str:
        """The shards serving the substreams, comma-separated, each once."""
        return ",".join(dict.fromkeys(s.address for s in self._streams))

    # --- FetchStream interface ------------------------------------------------------------------
    async def read(self, tag: int, region: str, indices: Sequence[int], priority: int = 0) -> None:
        """Send the whole read on the least loaded substream and remember it there until done."""
        await self.read_many([(tag, region, indices, priority)])

    async def read_many(self, reads: Sequence[ReadSpec]) -> None:
        """Each read to the least loaded substream as :meth:`read` does; one message per substream."""
        lanes: dict[int, list[ReadSpec]] = {}
        for tag, region, indices, priority in reads:
            lane = min(range(len(self._streams)), key=self._load.__getitem__)
            self._routes[tag] = _Route(lane, len(indices))
            self._load[lane] += len(indices)
            lanes.setdefault(lane, []).append((tag, region, indices, priority))
        for lane, lane_reads in sorted(lanes.items()):
            await self._streams[lane].read_many(lane_reads)

    async def cancel(self, tags: Sequence[int]) -> None:
        """Send each tag's cancel to the substream that owns it; tags already done are dropped."""
        owned: dict[int, list[int]] = {}
        for tag in tags:
            route = self._routes.get(tag)
            if route is not None:
                owned.setdefault(route.lane, []).append(tag)
        for lane, lane_tags in sorted(owned.items()):
            await self._streams[lane].cancel(lane_tags)

    async def responses(self) -> AsyncIterator[FetchBatch]:
        """Every substream's batches as they arrive; raises the first substream error (or end)."""
        self._broken = None
        queue: asyncio.Queue[tuple[int, FetchBatch | Exception]] = asyncio.Queue(maxsize=len(self._streams))
        drains = [asyncio.create_task(self._drain(lane, stream, queue)) for lane, stream in enumerate(self._streams)]
        try:
            while True:
                lane, item = await queue.get()
                if isinstance(item, Exception):
                    self._broken = self._streams[lane]
                    raise item
                if item.error_code:  # the pump may fail over on an in-band error: it is this substream's
                    self._broken = self._streams[lane]
                self._arrived(item)
                yield item
        finally:
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            while not queue.empty():  # batches never handed over: their shared memory goes back
                _, item = queue.get_nowait()
                if isinstance(item, FetchBatch):
                    _release(item)

    async def close(self) -> None:
        await _close_all(self._streams)

    def can_fail_over(self, error: ComputeError) -> bool:
        return (self._broken or self._streams[0]).can_fail_over(error)

    async def failover(self, error: BaseException) -> bool:
        """End every call (see the module docstring): the substream that failed moves to its next
        replica, the others open again where they were. True while the one that failed goes on."""
        broken = self._broken
        self._routes.clear()
        outcomes = await asyncio.gather(*(
            s.failover(error) if broken is None or s is broken else _reopen(s) for s in self._streams))
        if broken is not None and not outcomes[self._streams.index(broken)]:
            await self.close()
            return False
        dropped = [s for s, ok in zip(self._streams, outcomes) if not ok]
        self._streams = [s for s, ok in zip(self._streams, outcomes) if ok]
        self._load = [0] * len(self._streams)
        if dropped:
            log.warning("fetch of %s (%s): %d of %d streams dropped, no replica left for them",
                        dropped[0].prefix_id, dropped[0].layout, len(dropped), len(dropped) + len(self._streams))
        if not self._streams:  # every substream failed (the failure was not placed): none is left
            self._streams = dropped
            return False
        return True

    def exhausted(self, error: BaseException | None = None) -> ComputeError:
        """The error of the substream that failed last (it names the replicas it tried)."""
        return (self._broken or self._streams[0]).exhausted(error)

    # --- internals ------------------------------------------------------------------------------
    def _arrived(self, batch: FetchBatch) -> None:
        route = self._routes.get(batch.tag)
        if route is None:
            return
        count = min(len(batch.indices), route.left)
        route.left -= count
        self._load[route.lane] -= count
        if batch.done:  # the rest of a cancelled or failed read never comes
            self._load[route.lane] -= route.left
            del self._routes[batch.tag]

    @staticmethod
    async def _drain(lane: int, stream: ReplicaStream,
                     queue: asyncio.Queue[tuple[int, FetchBatch | Exception]]) -> None:
        """Move one substream's batches into ``queue``, then its error (or its end, as an error)."""
        try:
            responses = cast(AsyncGenerator[FetchBatch, None], stream.responses())  # an async generator
            async with contextlib.aclosing(responses) as batches:
                async for batch in batches:
                    try:
                        await queue.put((lane, batch))
                    except asyncio.CancelledError:
                        _release(batch)
                        raise
            error: Exception = ComputeError(f"cache server {stream.address}: fetch stream ended", code="UNAVAILABLE")
        except Exception as exc:  # noqa: BLE001 - the consumer decides; CancelledError passes
            error = exc
        await queue.put((lane, error))


async def _reopen(stream: ReplicaStream) -> bool:
    """Open ``stream`` again on the replica it was on, or if that refuses on its next one not tried.

    A :class:`ReplicaStream` tries its replicas in order and skips those in ``tried``; the one it
    is on is the last of ``tried``. Taking that one off makes :meth:`ReplicaStream.start` open it
    again, without counting the closing as its failure. False when no replica is left.
    """
    await stream.close()
    if stream.tried:
        stream.tried.pop()
    try:
        await stream.start()
    except ComputeError:
        return False
    return True


def _release(batch: FetchBatch) -> None:
    """Give back the shared memory under a batch that is dropped (a no-op for bytes over gRPC)."""
    if batch.lease is not None:
        batch.lease.release()


async def _close_all(streams: Sequence[ReplicaStream]) -> None:
    await asyncio.gather(*(s.close() for s in streams))
