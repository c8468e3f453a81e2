"""A Fetch stream over a prefix's replicas: the first live one, then the next when it breaks.

:class:`ReplicaStream` looks like one :class:`~.record_stream.RecordStream` (``open``/``read``/
``cancel``/``responses``/``close``) and adds :meth:`ReplicaStream.failover`: close the broken
stream and open the same object on the next replica not tried yet. It does not remember requests;
:class:`~..kvio.loader.KVLoader` re-sends, on the new stream, every read whose records have not all
arrived (only the records still missing). Each replica is tried at most once per stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from contiguouskv.common.fetch_wire import FetchBatch
from contiguouskv.compute_server.cachenet.record_stream import ReadSpec, RecordStream
from contiguouskv.compute_server.errors import ComputeError

log = logging.getLogger(__name__)

Connect = Callable[[str], Awaitable[RecordStream]]
"""Open a Fetch call to one shard and send its ``open`` message."""

FAILOVER_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS", "NOT_FOUND", "DEADLINE_EXCEEDED",
                            "CANCELLED", "ABORTED", "RESOURCE_EXHAUSTED"})
"""Failures another replica may not have: a dead or draining shard, a missing or damaged copy.
INVALID_ARGUMENT and FAILED_PRECONDITION are the request's own fault and end it."""


class ReplicaStream:
    """One logical Fetch stream of ``prefix_id``/``layout`` over ``replicas`` (in read order)."""

    def __init__(self, prefix_id: str, layout: str, replicas: Sequence[str], connect: Connect,
                 on_failure: Callable[[str, ComputeError], None] | None = None) -> None:
        self.prefix_id = prefix_id
        self.layout = layout
        self.replicas = list(replicas)
        self.tried: list[str] = []
        self.failures: list[str] = []  # "address: error" of every replica given up on
        self._connect = connect
        self._on_failure = on_failure
        self._current: "RecordStream | None" = None

    @property
    def address(self) -> str:
        return self._current.address if self._current is not None else (self.tried[-1] if self.tried else "")

    async def start(self) -> None:
        """Open the first replica that takes the ``open`` message; UNAVAILABLE naming all if none does."""
        if not await self._next():
            raise self.exhausted()

    async def failover(self, error: BaseException) -> bool:
        """Give up the current replica after ``error``; True once the next one is open."""
        current, self._current = self._current, None
        if current is not None:
            await current.close()
            self._given_up(current.address, error)
        if getattr(error, "code", "INTERNAL") not in FAILOVER_CODES:
            return False
        return await self._next()

    def exhausted(self, error: BaseException | None = None) -> ComputeError:
        """The error to report once no replica is left."""
        if isinstance(error, ComputeError) and (len(self.replicas) <= 1 or not self.failures):
            return error  # one replica, or a failure that is not the replica's: as it was
        code = getattr(error, "code", "UNAVAILABLE") if error is not None else "UNAVAILABLE"
        return ComputeError(f"fetch of prefix {self.prefix_id} ({self.layout}) failed on every replica: "
                            + "; ".join(self.failures or ["no replica"]), code=code)

    async def _next(self) -> bool:
        for address in self.replicas:
            if address in self.tried:
                continue
            self.tried.append(address)
            try:
                self._current = await self._connect(address)
            except ComputeError as err:
                self._given_up(address, err)
                continue
            if len(self.tried) > 1:
                log.warning("fetch of %s (%s): continuing on replica %s after %s", self.prefix_id, self.layout,
                            address, self.failures[-1] if self.failures else "a failure")
            return True
        return False

    def _given_up(self, address: str, error: BaseException) -> None:
        self.failures.append(f"{address}: {error}")
        if self._on_failure is not None and isinstance(error, ComputeError):
            self._on_failure(address, error)

    def can_fail_over(self, error: ComputeError) -> bool:
        return error.code in FAILOVER_CODES

    # --- FetchStream interface ------------------------------------------------------------------
    async def read(self, tag: int, region: str, indices: Sequence[int], priority: int = 0) -> None:
        await self._stream().read(tag, region, indices, priority)

    async def read_many(self, reads: Sequence[ReadSpec]) -> None:
        await self._stream().read_many(reads)

    async def cancel(self, tags: Sequence[int]) -> None:
        await self._stream().cancel(tags)

    async def responses(self) -> AsyncIterator[FetchBatch]:
        async for batch in self._stream().responses():
            yield batch

    async def close(self) -> None:
        if self._current is not None:
            await self._current.close()

    def _stream(self) -> RecordStream:
        if self._current is None:
            raise ComputeError(f"fetch of prefix {self.prefix_id}: no replica open", code="UNAVAILABLE")
        return self._current
