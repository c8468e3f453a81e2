"""Admission: how many requests run at once, how much KV they may stage, and a bounded queue.

A request is admitted before it opens a Fetch stream or stages any KV. It runs when fewer than
``max_active_requests`` run and its staging estimate fits in ``max_staged_bytes`` beside theirs
(a request alone is always admitted, whatever its estimate, so nothing waits forever); otherwise it
waits in a FIFO queue of at most ``max_queued_requests``. A full queue refuses with
RESOURCE_EXHAUSTED naming the limit and its value. Draining (server shutdown) refuses new and queued
requests with UNAVAILABLE. ``on_idle`` is called whenever the last running request ends with none
queued (the compute server returns freed memory to the kernel then). Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from contiguouskv.compute_server.errors import ComputeError, Unavailable


class ResourceExhausted(ComputeError):
    """A limit of the server refused the request; the message names it and its value."""

    code = "RESOURCE_EXHAUSTED"


@dataclass
class _Waiter:
    cost: int
    future: asyncio.Future[None]


@dataclass(frozen=True)
class AdmissionSnapshot:
    active: int
    queued: int
    staged_bytes: int


class Admission:
    """See the module docstring; ``slot(cost)`` is the one way in."""

    def __init__(self, max_active_requests: int, max_queued_requests: int, max_staged_bytes: int,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.max_active = max_active_requests
        self._on_idle = on_idle
        self.max_queued = max_queued_requests
        self.max_staged_bytes = max_staged_bytes
        self._active = 0
        self._staged = 0
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._draining = False

    def snapshot(self) -> AdmissionSnapshot:
        return AdmissionSnapshot(self._active, len(self._queue), self._staged)

    @contextlib.asynccontextmanager
    async def slot(self, cost: int) -> AsyncIterator[None]:
        """Wait for admission (cancellable), hold it for the body, release it after."""
        await self._admit(max(0, cost))
        try:
            yield
        finally:
            self._release(max(0, cost))

    def drain(self, reason: str) -> None:
        """Refuse everything from now on; queued requests fail with UNAVAILABLE."""
        self._draining = True
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(Unavailable(reason))

    async def _admit(self, cost: int) -> None:
        if self._draining:
            raise Unavailable("the compute server is shutting down")
        if not self._queue and self._fits(cost):
            self._take(cost)
            return
        if len(self._queue) >= self.max_queued:
            raise ResourceExhausted(
                f"compute server busy: {self._active} requests running (max_active_requests={self.max_active}) "
                f"and {len(self._queue)} waiting (max_queued_requests={self.max_queued}); retry later")
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter in self._queue:
                self._queue.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release(cost)  # admitted just as the caller gave up
            raise

    def _fits(self, cost: int) -> bool:
        if self._active >= self.max_active:
            return False
        return self._active == 0 or self._staged + cost <= self.max_staged_bytes

    def _take(self, cost: int) -> None:
        self._active += 1
        self._staged += cost

    def _release(self, cost: int) -> None:
        self._active -= 1
        self._staged -= cost
        self._wake()
        if self._active == 0 and not self._queue and self._on_idle is not None:
            self._on_idle()

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0].cost):  # FIFO: the head goes first
            waiter = self._queue.popleft()
            if waiter.future.done():
                continue
            self._take(waiter.cost)
            waiter.future.set_result(None)
