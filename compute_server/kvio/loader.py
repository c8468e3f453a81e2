"""Layer-wise loading of prefix KV from a Fetch stream, as start/wait pairs.

One writer task on the event loop sends requests in the order they were started (from the loop or
from the compute thread). The receiver files every arriving kv record as a (K, V) view over the
received bytes under (layer, chunk) and wakes waiters. The compute thread calls
:meth:`KVLoader.wait_for_layer` with the chunks that layer attends to and blocks only until those
records are in. Records of other regions (identification keys, digests, stats, tokens) are
collected per request and handed over as a future.

Fail-over: the loader remembers every read sent and how many of its records arrived (a request's
records arrive in the order asked). When the stream breaks (or a read fails in-band with a code
another replica may not share) and the stream can fail over (:class:`~.failover.ReplicaStream`),
it opens the next replica and sends again, under the same tags, the records still missing of
every read not finished; records already received stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import cast

import grpc
import torch

from contiguouskv.compute_server.cachenet.cache_client import RecordStream
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.layouts.packing import unpack_kv_record

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

log = logging.getLogger(__name__)


@dataclass
class _Read:
    """A read sent on the stream and not finished: ``indices[:received]`` have arrived."""

    region: str
    indices: list[int]
    priority: int
    received: int = 0


@dataclass
class _Blob:
    future: "Future[list[bytes]]"
    category: str
    parts: list[bytes] = field(default_factory=list)


class KVLoader:
    """Collects records of one prefix; ``start_load``/``wait_for_layer`` per layer.

    When a policy announces a layer's chunk set early (:meth:`expect`), the layer's K/V are
    assembled off the compute thread as soon as the last record arrives: gathered into one tensor
    (pinned host memory on CUDA) and, on CUDA, copied to the device on a side stream with an event
    the compute stream waits on. ``wait_for_layer`` then only picks up the staged tensors.
    """

    def __init__(self, layout: ContiguousLayout, stream: RecordStream, loop: asyncio.AbstractEventLoop,
                 device: torch.device | str = "cpu", stager: Executor | None = None) -> None:
        self.layout = layout
        self._stream = stream
        self._loop = loop
        self._device = torch.device(device)
        self._stager = stager
        self._cond = threading.Condition()
        self._arrived: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._expected: dict[int, list[int]] = {}
        self._staging: set[int] = set()
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}
        self._pinned: list[torch.Tensor] = []  # host sources of in-flight device copies
        self._blobs: dict[int, _Blob] = {}
        self._tags = itertools.count(1)
        self._outbox: asyncio.Queue[object] = asyncio.Queue()
        self._error: BaseException | None = None
        self._reads: dict[int, _Read] = {}  # tag -> unfinished read; event loop only
        self.failovers: list[str] = []  # "from -> to" per fail-over
        self.bytes_by_category: dict[str, int] = {}
        self.kv_records_received = 0
        self.first_request_at: float | None = None
        self.last_arrival_at: float | None = None

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes_by_category.values())

    # --- starting requests (any thread) --------------------------------------------------------
    def start_load(self, chunks: Sequence[int], layers: range, priority: int = 0) -> list[int]:
        """Ask for the kv records of ``chunks`` at ``layers`` in one request per region; returns tags."""
        tags = []
        for region, indices in self.layout.kv_requests(list(chunks), layers).items():
            tag = next(self._tags)
            tags.append(tag)
            self._send(("read", tag, region, indices, priority))
        return tags

    def start_load_per_chunk(self, chunks: Sequence[int], layers: range, priority: int = 0) -> dict[int, list[int]]:
        """Like :meth:`start_load` but one request per chunk, so each can be cancelled alone."""
        return {chunk: self.start_load([chunk], layers, priority) for chunk in sorted(set(chunks))}

    def start_blob(self, region: str, indices: Sequence[int], priority: int = -1,
                   category: str = "meta") -> "Future[list[bytes]]":
        """Ask for whole records of a non-kv region; the future yields them in the order asked."""
        tag = next(self._tags)
        future: Future[list[bytes]] = Future()
        with self._cond:
            self._blobs[tag] = _Blob(future, category)
        self._send(("read", tag, region, list(indices), priority))
        return future

    def cancel(self, tags: Sequence[int]) -> None:
        """Drop the not-yet-served parts of these requests (records already sent still arrive)."""
        if tags:
            self._send(("cancel", list(tags)))

    def _send(self, item: object) -> None:
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, item)

    # --- event loop side -----------------------------------------------------------------------
    async def run(self) -> None:
        """Send queued requests and receive records until cancelled or the stream fails.

        A broken stream fails over to the next replica when the stream can (see the module
        docstring); otherwise, or when no replica is left, waiters get the error.
        """
        while True:
            writer = asyncio.create_task(self._write_loop())
            try:
                error = await self._receive()
            finally:
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if not await self._failover(error):
                exhausted = getattr(self._stream, "exhausted", None)
                self._fail(exhausted(error) if exhausted is not None else error)
                return

    async def _receive(self) -> ComputeError:
        """Receive until the stream breaks; returns why."""
        try:
            async with contextlib.aclosing(self._stream.responses()) as messages:  # type: ignore[type-var]
                async for message in messages:
                    error = self._on_message(message)
                    if error is not None:
                        return error
            return ComputeError(f"cache server {self._stream.address}: fetch stream ended", code="UNAVAILABLE")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure must wake the compute thread
            return exc if isinstance(exc, ComputeError) else ComputeError(f"fetch stream failed: {exc!r}")

    def _can_fail_over(self, error: ComputeError) -> bool:
        from contiguouskv.compute_server.cachenet.failover import FAILOVER_CODES

        return hasattr(self._stream, "failover") and error.code in FAILOVER_CODES

    async def _failover(self, error: ComputeError) -> bool:
        """Open the next replica and send again what is missing of every unfinished read."""
        if not self._can_fail_over(error):
            return False
        broken = self._stream.address
        if not await self._stream.failover(error):  # type: ignore[attr-defined]
            return False
        self.failovers.append(f"{broken} -> {self._stream.address}")
        reads = sorted(self._reads.items())
        log.warning("fetch stream from %s broke (%s): %d unfinished reads (%d records) go to %s",
                    broken, error, len(reads), sum(len(r.indices) - r.received for _, r in reads),
                    self._stream.address)
        for tag, read in reads:
            rest = _Read(read.region, read.indices[read.received:], read.priority)
            self._reads[tag] = rest
            try:
                await self._stream.read(tag, rest.region, rest.indices, rest.priority)
            except ComputeError:
                break  # this stream broke too: the receiver sees it and fails over again
        return True

    async def _write_loop(self) -> None:
        try:
            while True:
                item = await self._outbox.get()
                if item[0] == "read":  # type: ignore[index]
                    tag, region, indices, priority = cast(tuple[int, str, list[int], int], item[1:])  # type: ignore[index]
                    if indices:
                        self._reads[tag] = _Read(region, list(indices), priority)
                    await self._stream.read(tag, region, indices, priority)
                else:
                    for cancelled in item[1]:  # type: ignore[index]
                        self._reads.pop(cancelled, None)
                    await self._stream.cancel(item[1])  # type: ignore[index]
        except ComputeError as exc:
            if not hasattr(self._stream, "failover"):
                self._fail(exc)
            # else the receiver sees the broken stream and fails over; the read is in _reads

    def _on_message(self, message: object) -> ComputeError | None:
        """File one response; returns an in-band error to fail over on, else None."""
        m = message
        if m.error_code:  # type: ignore[attr-defined]
            code = STATUS_NAMES.get(m.error_code, "INTERNAL")  # type: ignore[attr-defined]
            error = ComputeError(f"cache server {self._stream.address}: {m.error_message}", code=code)  # type: ignore[attr-defined]
            if self._can_fail_over(error):
                return error
            self._fail(error)
            return None
        read = self._reads.get(m.tag)  # type: ignore[attr-defined]
        if read is not None:
            read.received += len(m.indices)  # type: ignore[attr-defined]
            if m.done or read.received >= len(read.indices):  # type: ignore[attr-defined]
                del self._reads[m.tag]  # type: ignore[attr-defined]
        data = m.data  # type: ignore[attr-defined]
        self.last_arrival_at = time.perf_counter()
        blob = self._blobs.get(m.tag)  # type: ignore[attr-defined]
        if blob is not None:
            self._on_blob(m.tag, blob, m)  # type: ignore[attr-defined]
            return None
        if not m.indices:  # type: ignore[attr-defined]
            return None  # an empty "done"/"cancelled" marker
        self.bytes_by_category["kv"] = self.bytes_by_category.get("kv", 0) + len(data)
        group = int(m.region.split("G", 1)[1])  # type: ignore[attr-defined]
        size = self.layout.kv_record_size
        view = memoryview(data)
        with self._cond:
            layers = set()
            for i, index in enumerate(m.indices):  # type: ignore[attr-defined]
                chunk, layer = self.layout.kv_record_owner(group, index)
                self._arrived.setdefault(layer, {})[chunk] = unpack_kv_record(self.layout, view[i * size : (i + 1) * size])
                layers.add(layer)
            self.kv_records_received += len(m.indices)  # type: ignore[attr-defined]
            for layer in layers:
                self._maybe_stage(layer)
            self._cond.notify_all()
        return None

    def _on_blob(self, tag: int, blob: _Blob, m: object) -> None:
        count = len(m.indices)  # type: ignore[attr-defined]
        data = m.data  # type: ignore[attr-defined]
        self.bytes_by_category[blob.category] = self.bytes_by_category.get(blob.category, 0) + len(data)
        size = len(data) // max(1, count)
        blob.parts += [data[i * size : (i + 1) * size] for i in range(count)]
        if m.done:  # type: ignore[attr-defined]
            with self._cond:
                self._blobs.pop(tag, None)
            if not blob.future.done():
                blob.future.set_result(blob.parts)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            blobs = list(self._blobs.values())
            self._blobs.clear()
            self._cond.notify_all()
        for blob in blobs:
            if not blob.future.done():
                blob.future.set_exception(exc)

    # --- staging (off the compute thread) -------------------------------------------------------
    def expect(self, layers: range, chunks: Sequence[int]) -> None:
        """Announce the chunks these layers will attend to, so they are staged on arrival."""
        with self._cond:
            for layer in layers:
                self._expected[layer] = sorted(set(chunks))
                self._maybe_stage(layer)

    def _maybe_stage(self, layer: int) -> None:
        """Caller holds the lock. Stage ``layer`` once every expected record is in."""
        want = self._expected.get(layer)
        have = self._arrived.get(layer, {})
        if self._stager is None or want is None or layer in self._staging or not all(c in have for c in want):
            return
        self._staging.add(layer)
        self._stager.submit(self._stage, layer, want, [have[c] for c in want])

    def _stage(self, layer: int, want: list[int], parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        try:
            keys, values = self._gather(want, parts)
            event = None
            if self._device.type == "cuda":
                with self._cond:
                    self._pinned += [keys, values]
                keys, values, event = _to_device(keys, values, self._device)
        except BaseException as exc:  # noqa: BLE001 - surfaces in wait_for_layer
            self._fail(ComputeError(f"staging layer {layer} failed: {exc!r}"))
            return
        with self._cond:
            self._staged[layer] = (keys, values, event)
            self._cond.notify_all()

    def _gather(self, want: list[int], parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        real = self.layout.tokens_in(want)  # only the prefix's last chunk is partial; it sorts last
        pin = self._device.type == "cuda"
        shape = (self.layout.num_kv_heads, len(want) * self.layout.chunk_size, self.layout.head_dim)
        keys = torch.empty(shape, dtype=parts[0][0].dtype, pin_memory=pin)  # [kv_heads, chunks * c, d]
        values = torch.empty(shape, dtype=parts[0][1].dtype, pin_memory=pin)
        torch.cat([k for k, _ in parts], dim=1, out=keys)
        torch.cat([v for _, v in parts], dim=1, out=values)
        return keys[:, :real], values[:, :real]

    # --- compute thread side -------------------------------------------------------------------
    def wait_blob(self, future: "Future[list[bytes]]") -> tuple[list[bytes], float]:
        """Block for a blob request; returns its records and the seconds spent waiting."""
        start = time.perf_counter()
        return future.result(), time.perf_counter() - start

    def wait_for_layer(self, layer: int, chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Block until every record of ``chunks`` at ``layer`` has arrived.

        Returns K and V of those chunks' real tokens ([kv_heads, tokens, head_dim] each, chunks
        ascending) and the seconds spent blocked. Raises the stream's error if it failed.
        """
        want = sorted(set(chunks))
        staged = self._expected.get(layer) == want and self._stager is not None
        start = time.perf_counter()
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if staged:
                    if layer in self._staged:
                        keys, values, event = self._staged[layer]
                        break
                else:
                    have = self._arrived.get(layer, {})
                    if all(c in have for c in want):
                        parts = [have[c] for c in want]
                        break
                self._cond.wait()
        waited = time.perf_counter() - start
        if not staged:
            keys, values = self._gather(want, parts) if want else _empty_kv(self.layout)
            return keys, values, waited
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)  # type: ignore[arg-type]
        return keys, values, waited

    def release_layer(self, layer: int) -> None:
        """Drop the arrived records of a finished layer so their bytes can be freed."""
        with self._cond:
            self._arrived.pop(layer, None)
            self._staged.pop(layer, None)
            self._staging.discard(layer)


def _empty_kv(layout: ContiguousLayout) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (layout.num_kv_heads, 0, layout.head_dim)
    return torch.empty(shape), torch.empty(shape)


def _to_device(keys: torch.Tensor, values: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Copy pinned K/V to the device on a side stream; returns them and the event marking the copy done."""
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        k = keys.to(device, non_blocking=True)
        v = values.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    # the pinned sources stay referenced by the loader until the request ends
    k.record_stream(torch.cuda.current_stream(device))
    v.record_stream(torch.cuda.current_stream(device))
    return k, v, event
