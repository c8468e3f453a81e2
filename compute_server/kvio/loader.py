"""Layer-wise loading of one request's prefix KV from a Fetch stream, as start/wait pairs.

``start_*`` calls (any thread, never block) queue requests on the request's
:class:`~.pump.FetchPump`; ``wait_*`` calls (compute thread, block) return once what they need has
arrived, and raise instead when the stream failed or the request was cancelled, so no wait outlives
its request. The layout codec decides which arriving records are per-layer K/V: those are filed
under (layer, unit) and waited for with :meth:`KVLoader.wait_for_layer`; every other record is
collected per request and handed over whole through a future (:meth:`KVLoader.start_blob`).

When a policy announces a layer's unit set early (:meth:`KVLoader.expect`), the layer's K/V are
gathered off the compute thread as soon as its last record arrives (the stager thread), and on CUDA
copied to the device on a side stream (:mod:`.staging`); ``wait_for_layer`` then only picks them up.

On the CPU a layer's K/V are gathered into host buffers the request reuses: once the engine has
copied a layer's prefix K/V into its attention input (:meth:`KVLoader.consumed`), the layer's
buffers gather a later layer. A fresh 16 MiB tensor per layer and direction costs its pages'
faults every time, since the compute server's malloc serves blocks that large by ``mmap``
(:mod:`contiguouskv.common.malloc`; measured in docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch

from contiguouskv.common.fetch_wire import FetchBatch, Lease
from contiguouskv.compute_server.cachenet.record_stream import FetchStream
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.kvio.pump import FetchPump
from contiguouskv.compute_server.kvio.staging import to_device, to_device_now, wait_copy
from contiguouskv.compute_server.layouts.base import KVRef, LayoutCodec

KVPair = tuple[torch.Tensor, torch.Tensor]
MAX_POOLED = 4  # gather buffer pairs a request keeps for reuse (the stager runs a few layers ahead)
Records = list[memoryview]
"""Whole records of a blob request, in the order asked: views over the received bytes."""


@dataclass
class _Blob:
    future: Future[Records]
    category: str
    parts: Records = field(default_factory=list)


@dataclass(eq=False)
class _SharedLease:
    """A batch's shared-memory lease, split over the layers whose records it holds."""

    lease: Lease
    layers: int

    def drop(self) -> bool:
        """One layer is done with it (caller holds the loader's lock); True when none is left."""
        self.layers -= 1
        return self.layers == 0


@dataclass(frozen=True)
class _Staged:
    keys: torch.Tensor
    values: torch.Tensor
    copied: object  # the CUDA event of the device copy, or None


class KVLoader:
    """Records of one prefix object for one request; see the module docstring."""

    def __init__(self, codec: LayoutCodec, stream: FetchStream, loop: asyncio.AbstractEventLoop,
                 device: torch.device | str = "cpu", stager: Executor | None = None,
                 max_held_bytes: int = 0) -> None:
        self.codec = codec
        self._device = torch.device(device)
        self._stager = stager
        self._max_held = max_held_bytes  # 0: no back-pressure
        self._held = 0  # K/V record bytes arrived and not yet released
        self._held_by_layer: dict[int, int] = {}
        self._waiters = 0
        self._pump = FetchPump(stream, loop, self._on_batch, self._fail, self._has_room)
        self._cond = threading.Condition()
        self._arrived: dict[int, dict[int, KVRef]] = {}  # layer -> unit -> (batch view, row)
        self._expected: dict[int, list[int]] = {}
        self._staging: set[int] = set()
        self._staged: dict[int, _Staged] = {}
        self._pinned: list[torch.Tensor] = []  # host sources of in-flight device copies
        self._pool: list[KVPair] = []  # flat host buffers free to gather into (CPU)
        self._lent: dict[int, KVPair] = {}  # layer -> the buffers its K/V were gathered into
        self._blobs: dict[int, _Blob] = {}
        self._leases: dict[int, list[_SharedLease]] = {}  # layer -> shared memory under its records
        self._tags = itertools.count(1)
        self._error: BaseException | None = None
        self.bytes_by_category: dict[str, int] = {}
        self.kv_records_received = 0
        self.bytes_shm = 0  # of the bytes received, those that came through the shared-memory plane

    # --- accounting ------------------------------------------------------------------------------
    @property
    def bytes_received(self) -> int:
        return sum(self.bytes_by_category.values())

    @property
    def failovers(self) -> list[str]:
        return self._pump.failovers

    @property
    def first_request_at(self) -> float | None:
        return self._pump.first_request_at

    @property
    def last_arrival_at(self) -> float | None:
        return self._pump.last_arrival_at

    # --- start (any thread, never blocks) -------------------------------------------------------
    def start_load(self, units: Sequence[int], layers: range, priority: int = 0) -> list[int]:
        """Ask for the K/V records of ``units`` at ``layers``, one request per region; returns tags."""
        reads: list[tuple[int, str, Sequence[int], int]] = []
        tags = self._kv_reads(units, layers, priority, reads)
        self._pump.send_reads(reads)
        return tags

    def start_load_per_unit(self, units: Sequence[int], layers: range, priority: int = 0) -> dict[int, list[int]]:
        """Like :meth:`start_load` but one request per unit, so each can be cancelled alone (posted
        to the event loop together)."""
        reads: list[tuple[int, str, Sequence[int], int]] = []
        tags = {unit: self._kv_reads([unit], layers, priority, reads) for unit in sorted(set(units))}
        self._pump.send_reads(reads)
        return tags

    def _kv_reads(self, units: Sequence[int], layers: range, priority: int,
                  reads: list[tuple[int, str, Sequence[int], int]]) -> list[int]:
        """Append the reads of ``units`` at ``layers`` (one per region) to ``reads``; returns their tags."""
        tags = []
        for region, indices in self.codec.kv_requests(units, layers).items():
            tag = next(self._tags)
            tags.append(tag)
            reads.append((tag, region, indices, priority))
        return tags

    def start_blob(self, region: str, indices: Sequence[int], priority: int = -1,
                   category: str = "meta") -> Future[Records]:
        """Ask for whole records of a region; the future yields them in the order asked.

        ``category`` (``ident``, ``kv``, ``meta``, ``eval``) is what the bytes are counted as."""
        future: Future[Records] = Future()
        if not indices:
            future.set_result([])
            return future
        tag = next(self._tags)
        with self._cond:
            if self._error is not None:
                future.set_exception(self._error)
                return future
            self._blobs[tag] = _Blob(future, category)
        self._pump.send_read(tag, region, list(indices), priority)
        return future

    def cancel(self, tags: Sequence[int]) -> None:
        """Drop the not-yet-served parts of these requests (records already sent still arrive)."""
        self._pump.send_cancel(tags)

    def expect(self, layers: range, units: Sequence[int]) -> None:
        """Announce the units these layers will attend to, so they are staged on arrival."""
        with self._cond:
            for layer in layers:
                self._expected[layer] = sorted(set(units))
                self._maybe_stage(layer)

    # --- event loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Move the request's Fetch traffic until cancelled or the stream fails.

        However it ends, every wait of the request is woken: with the stream's error, or with
        CANCELLED when the request was cancelled.
        """
        try:
            await self._pump.run()
        finally:
            self._fail(ComputeError("request cancelled: its fetch stream was closed", code="CANCELLED"))
            self._release_leases()

    def _release_leases(self) -> None:
        """Give back every shared-memory slot still held (the request is over; views die with it)."""
        with self._cond:
            leases = {id(s): s for group in self._leases.values() for s in group}
            self._leases.clear()
            self._arrived.clear()
        for shared in leases.values():
            shared.lease.release()

    def _on_batch(self, batch: FetchBatch) -> None:
        data = batch.data
        blob = self._blobs.get(batch.tag)
        if blob is not None:
            self._on_blob(batch.tag, blob, batch)
            return
        if not batch.indices:
            return  # an empty "done"/"cancelled" marker
        records = self.codec.kv_records(batch.region, batch.indices, memoryview(data))
        if records is None:
            if batch.lease is not None:
                batch.lease.release()
            return  # a late record of a cancelled blob request
        self.bytes_by_category["kv"] = self.bytes_by_category.get("kv", 0) + len(data)
        if batch.lease is not None:
            self.bytes_shm += len(data)
        size = len(data) // len(records)
        with self._cond:
            layers = set()
            for layer, unit, rows, row in records:
                self._arrived.setdefault(layer, {})[unit] = (rows, row)
                self._held_by_layer[layer] = self._held_by_layer.get(layer, 0) + size
                layers.add(layer)
            self._held += size * len(records)
            self.kv_records_received += len(records)
            if batch.lease is not None:  # shared memory under the views: free once each layer is done
                shared = _SharedLease(batch.lease, len(layers))
                for layer in layers:
                    self._leases.setdefault(layer, []).append(shared)
            for layer in layers:
                self._maybe_stage(layer)
            self._cond.notify_all()

    def _on_blob(self, tag: int, blob: _Blob, batch: FetchBatch) -> None:
        count, data = len(batch.indices), batch.data
        self.bytes_by_category[blob.category] = self.bytes_by_category.get(blob.category, 0) + len(data)
        if batch.lease is not None:
            self.bytes_shm += len(data)
        size = len(data) // max(1, count)
        if batch.lease is not None:  # blobs outlive the request (ident cache): copied out of shared memory
            blob.parts += [memoryview(bytes(data[i * size : (i + 1) * size])) for i in range(count)]
            batch.lease.release()
        else:
            blob.parts += [data[i * size : (i + 1) * size] for i in range(count)]
        if batch.done:
            with self._cond:
                self._blobs.pop(tag, None)
            if not blob.future.done():
                blob.future.set_result(blob.parts)

    def _fail(self, exc: BaseException) -> None:
        """End the request's loading: the first error wins; every waiter wakes and raises it."""
        with self._cond:
            if self._error is None:
                self._error = exc
            blobs = list(self._blobs.values())
            self._blobs.clear()
            self._cond.notify_all()
        for blob in blobs:
            if not blob.future.done():
                blob.future.set_exception(self._error)

    # --- staging (stager thread) ----------------------------------------------------------------
    def _maybe_stage(self, layer: int) -> None:
        """Caller holds the lock. Stage ``layer`` once every expected record is in."""
        want = self._expected.get(layer)
        have = self._arrived.get(layer, {})
        if self._stager is None or want is None or layer in self._staging or len(have) < len(want) \
                or not all(c in have for c in want):  # the count first: O(1) for most of a layer's batches
            return
        self._staging.add(layer)
        self._stager.submit(self._stage, layer, want, [have[c] for c in want])

    def _stage(self, layer: int, want: list[int], parts: list[KVRef]) -> None:
        try:
            keys, values = self._gather(layer, want, parts)
            event = None
            if self._device.type == "cuda":
                with self._cond:
                    self._pinned += [keys, values]
                keys, values, event = to_device(keys, values, self._device)
        except BaseException as exc:  # noqa: BLE001 - surfaces in wait_for_layer
            self._fail(ComputeError(f"staging layer {layer} failed: {exc!r}"))
            return
        with self._cond:
            self._staged[layer] = _Staged(keys, values, event)
            self._cond.notify_all()

    # --- wait (compute thread, blocks) ----------------------------------------------------------
    def wait_blob(self, future: Future[Records]) -> tuple[Records, float]:
        """Block for a blob request; returns its records and the seconds spent waiting.

        Raises the stream's error, or CANCELLED once the request's loading ended."""
        start = time.perf_counter()
        if not future.done():
            with self._blocked():
                future.result()
        return future.result(), time.perf_counter() - start

    @contextlib.contextmanager
    def _blocked(self) -> Iterator[None]:
        """Count a blocked wait (the pump reads on whatever the back-pressure says)."""
        with self._cond:
            self._waiters += 1
        self._pump.room_made()
        try:
            yield
        finally:
            with self._cond:
                self._waiters -= 1

    def wait_for_layer(self, layer: int, units: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Block until every record of ``units`` at ``layer`` has arrived.

        Returns K and V of those units' real tokens ([kv_heads, tokens, head_dim] each, units
        ascending) and the seconds spent blocked. Raises the stream's error if it failed.
        """
        want = sorted(set(units))
        staged = self._expected.get(layer) == want and self._stager is not None
        start = time.perf_counter()
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if staged and layer in self._staged:
                    ready = self._staged[layer]
                    break
                have = self._arrived.get(layer, {})
                if not staged and all(c in have for c in want):
                    parts = [have[c] for c in want]
                    break
                self._waiters += 1
                self._pump.room_made()
                try:
                    self._cond.wait()
                finally:
                    self._waiters -= 1
        waited = time.perf_counter() - start
        if not staged:  # gathered here, on the request's thread, and staged through the same path
            keys, values = self._gather(layer, want, parts)
            return to_device_now(keys, self._device), to_device_now(values, self._device), waited
        wait_copy(ready.copied, self._device)
        return ready.keys, ready.values, waited

    def _gather(self, layer: int, want: list[int], parts: list[KVRef]) -> KVPair:
        """K/V of ``want`` at ``layer``: on CUDA into fresh pinned memory (torch's host allocator
        caches it), on the CPU into a pooled pair of buffers lent to the layer until :meth:`consumed`."""
        if self._device.type == "cuda" or not parts:
            return self.codec.gather(want, parts, pin=self._device.type == "cuda")
        batch = parts[0][0]  # [records, K/V, kv_heads, unit tokens, head_dim]
        numel = math.prod(batch.shape[2:]) * len(parts)
        dtype = batch.dtype
        with self._cond:
            fits = next((k for k, pair in enumerate(self._pool)
                         if pair[0].numel() >= numel and pair[0].dtype == dtype), None)
            pair = self._pool.pop(fits) if fits is not None else None
        if pair is None:
            pair = (torch.empty(numel, dtype=dtype), torch.empty(numel, dtype=dtype))
        keys, values = self.codec.gather(want, parts, pin=False, out=pair)
        with self._cond:
            self._lent[layer] = pair
        return keys, values

    def consumed(self, layer: int) -> None:
        """The engine is done with ``layer``'s prefix K/V (it copied them): their buffers may gather
        a later layer. Not calling it is safe (the buffers are then simply not reused)."""
        with self._cond:
            pair = self._lent.pop(layer, None)
            if pair is not None and len(self._pool) < MAX_POOLED:
                self._pool.append(pair)

    def release_layer(self, layer: int) -> None:
        """Drop the arrived records of a finished layer so their bytes can be freed."""
        with self._cond:
            self._arrived.pop(layer, None)
            self._staged.pop(layer, None)
            self._staging.discard(layer)
            self._held -= self._held_by_layer.pop(layer, 0)
            done = [s for s in self._leases.pop(layer, []) if s.drop()]
        for shared in done:
            shared.lease.release()
        self._pump.room_made()

    @property
    def held_bytes(self) -> int:
        """K/V record bytes arrived and not released yet."""
        return self._held

    def _has_room(self) -> bool:
        """Event loop: read on while under ``max_held_bytes``, or while a wait is blocked (the
        records it needs may be next in the stream: pausing then could never resume)."""
        return not self._max_held or self._held < self._max_held or self._waiters > 0
