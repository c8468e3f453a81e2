"""Layer-wise loading of prefix KV from a Fetch stream, as start/wait pairs.

The receiver runs on the event loop: every arriving kv record becomes a (K, V) view over the
received bytes, filed under (layer, chunk). The compute thread calls :meth:`KVLoader.wait_for_layer`
with the chunks that layer attends to; it blocks only until those records are in, then gathers them.
``start_load`` may be called from the compute thread (it hands the request to the event loop), so a
policy can ask for more records as soon as it knows it needs them.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from contiguouskv.compute_server.cache_client import RecordStream
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.layout import ContiguousLayout
from contiguouskv.compute_server.packing import unpack_kv_record


class KVLoader:
    """Collects kv records of one prefix; ``start_load``/``wait_for_layer`` per layer."""

    def __init__(self, layout: ContiguousLayout, stream: RecordStream, loop: asyncio.AbstractEventLoop) -> None:
        self.layout = layout
        self._stream = stream
        self._loop = loop
        self._cond = threading.Condition()
        self._arrived: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._blobs: dict[int, asyncio.Future[list[bytes]]] = {}
        self._blob_parts: dict[int, list[bytes]] = {}
        self._tags = itertools.count(1)
        self._error: BaseException | None = None
        self._pending: list[Future[list[int]]] = []
        self.bytes_received = 0
        self.first_request_at: float | None = None
        self.last_arrival_at: float | None = None

    # --- event loop side -----------------------------------------------------------------------
    async def request_kv(self, chunks: Sequence[int], layers: range, priority: int = 0) -> list[int]:
        """Ask for the kv records of ``chunks`` at ``layers``; returns the tags used."""
        tags = []
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        for region, indices in self.layout.kv_requests(list(chunks), layers).items():
            tag = next(self._tags)
            tags.append(tag)
            await self._stream.read(tag, region, indices, priority)
        return tags

    async def fetch_region(self, region: str, indices: Sequence[int], priority: int = -1) -> list[bytes]:
        """Whole records of a non-kv region (tokens, stats, ...), in the order asked."""
        tag = next(self._tags)
        future: asyncio.Future[list[bytes]] = self._loop.create_future()
        self._blobs[tag] = future
        self._blob_parts[tag] = []
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        await self._stream.read(tag, region, indices, priority)
        return await future

    async def receive(self) -> None:
        """Run until the stream ends; files every record; wakes waiters; records the first error."""
        try:
            async for message in self._stream.responses():
                self._on_message(message)
        except BaseException as exc:  # noqa: BLE001 - any failure must wake the compute thread
            self._fail(exc if isinstance(exc, ComputeError) else ComputeError(f"fetch stream failed: {exc!r}"))
            if not isinstance(exc, (ComputeError, asyncio.CancelledError)):
                raise

    def _on_message(self, message: object) -> None:
        data = message.data  # type: ignore[attr-defined]
        self.bytes_received += len(data)
        self.last_arrival_at = time.perf_counter()
        tag = message.tag  # type: ignore[attr-defined]
        if tag in self._blobs:
            self._on_blob(tag, message)
            return
        group = int(message.region.split("G", 1)[1])  # type: ignore[attr-defined]
        size = self.layout.kv_record_size
        view = memoryview(data)
        with self._cond:
            for i, index in enumerate(message.indices):  # type: ignore[attr-defined]
                chunk, layer = self.layout.kv_record_owner(group, index)
                k, v = unpack_kv_record(self.layout, view[i * size : (i + 1) * size])
                self._arrived.setdefault(layer, {})[chunk] = (k, v)
            self._cond.notify_all()

    def _on_blob(self, tag: int, message: object) -> None:
        parts = self._blob_parts[tag]
        size = len(message.data) // max(1, len(message.indices))  # type: ignore[attr-defined]
        parts += [message.data[i * size : (i + 1) * size] for i in range(len(message.indices))]  # type: ignore[attr-defined]
        if message.done:  # type: ignore[attr-defined]
            future = self._blobs.pop(tag)
            self._blob_parts.pop(tag)
            if not future.done():
                future.set_result(parts)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()
        for future in self._blobs.values():
            if not future.done():
                future.set_exception(exc)
        self._blobs.clear()

    # --- compute thread side -------------------------------------------------------------------
    def start_load(self, chunks: Sequence[int], layers: range, priority: int = 0) -> None:
        """Ask for records from any thread; does not block."""
        self._pending.append(asyncio.run_coroutine_threadsafe(self.request_kv(chunks, layers, priority), self._loop))

    def wait_for_layer(self, layer: int, chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block until every record of ``chunks`` at ``layer`` has arrived.

        Returns K and V of those chunks' real tokens, each [kv_heads, tokens, head_dim], chunks in
        the order given. Raises the stream's error if it failed.
        """
        want = sorted(set(chunks))
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                have = self._arrived.get(layer, {})
                if all(c in have for c in want):
                    parts = [have[c] for c in want]
                    break
                self._cond.wait(timeout=1.0)
                self._raise_failed_requests()
        keys = torch.cat([k for k, _ in parts], dim=1)  # [kv_heads, len(want) * c, head_dim]
        values = torch.cat([v for _, v in parts], dim=1)
        real = self.layout.tokens_in(want)
        # Only the prefix's last chunk is partial; it sorts last when present.
        return keys[:, :real], values[:, :real]

    def release_layer(self, layer: int) -> None:
        """Drop the arrived records of a finished layer so their bytes can be freed."""
        with self._cond:
            self._arrived.pop(layer, None)

    def _raise_failed_requests(self) -> None:
        for future in self._pending:
            if future.done() and future.exception() is not None:
                raise ComputeError(f"fetch request failed: {future.exception()}", code="UNAVAILABLE")
