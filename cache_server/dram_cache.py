"""The DRAM cache: record payloads kept in memory under a byte budget, evicted by an eviction rule.

Records are addressed by ``(object, region, index)``, where ``object`` is an :data:`ObjectId`
(the key and its commit time, so a prefix deleted and stored again never serves old bytes).
:meth:`DramCache.lookup` counts an access to every record asked (hit or miss);
:meth:`DramCache.admit` offers records just read from disk; :meth:`DramCache.report` adds what the
compute server observed (attention, important fraction). Which record goes when room is needed is
the eviction rule's call (:mod:`.eviction`): a lazy min-heap of priorities, where a record is admitted
only if it outranks the record it would evict.

The heap is lazy in two ways. An entry whose record was evicted or re-ranked is dropped when it
surfaces. And a hit does not re-rank its record: an access only raises a priority under every rule
(frequency and last access grow), so the record's entry may understate it until the entry reaches
the top, where its priority is recomputed and, if it rose, the entry goes back in. The record the
heap yields is therefore the one of lowest current priority, as with an eager heap, without a heap
push for every hit (which cost more than copying the record out on the shared-memory path). A
report may lower a priority (``impress``'s mean important fraction), so reports re-rank at once.

Storage. With ``shared`` (the server's default on Linux) an object's records live in its
:class:`~.dram_arena.Arena`, a sealed memfd mirroring the object's data file, so that a
co-located compute server can map it read-only and take a DRAM hit without a copy
(:mod:`.shm_plane`). Views handed out of an arena are *pinned* (:meth:`DramCache.lookup_pinned`)
until their :class:`Pin` is released: a pinned record that is evicted (or whose object is deleted)
is *retired*, still counted in the budget, and its pages are freed only when its last pin goes; a
retired record that is admitted again is simply kept (an object's bytes never change). An arena is
freed (``on_arena_closed``) once none of its object's records is cached or retired; the object's
next admission makes a new one, under a new number. Without ``shared`` records are immutable
``bytes`` and pins do nothing.

Thread-safe (one lock); called from the read pool. A budget of 0 disables the cache.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Sequence

from contiguouskv.cache_server.dram_arena import Arena, arenas_supported
from contiguouskv.cache_server.eviction import DEFAULT_EVICTION_RULE, Priority, RecordStats, eviction_rule
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.stats import Counters

ObjectId = tuple[ObjectKey, float]  # (key, committed_at)
RecordKey = tuple[int, str, int]  # (the object's number in this cache, region, index)
MAX_TRACKED = 1 << 20  # records with stats but no cached bytes kept before the stats are reset
Payload = bytes | memoryview  # bytes, or a read-only view into the object's arena


class Pin:
    """Holds the records under the views one lookup handed out; :meth:`release` (idempotent, any
    thread) lets them go. A pinned record's pages are not freed, even if it is evicted."""

    __slots__ = ("_cache", "_keys")

    def __init__(self, cache: DramCache | None, keys: list[RecordKey]) -> None:
        self._cache, self._keys = cache, keys

    @property
    def records(self) -> int:
        return len(self._keys)

    def release(self) -> None:
        keys, self._keys = self._keys, []
        if keys and self._cache is not None:
            self._cache._unpin(keys)


NO_PIN = Pin(None, [])


class DramCache:
    """Record payloads in DRAM, at most ``budget_bytes`` in all, kept by the eviction rule named ``rule``."""

    def __init__(self, budget_bytes: int, rule: str = DEFAULT_EVICTION_RULE,
                 counters: Counters | None = None, shared: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.shared = shared and budget_bytes > 0 and arenas_supported()
        self.eviction_rule = rule
        self._priority = eviction_rule(rule)
        self._counters = counters or Counters()
        self._lock = threading.Lock()
        self._data: dict[RecordKey, Payload] = {}
        self._arenas: dict[int, Arena] = {}  # object number -> its arena (shared)
        self._offsets: dict[RecordKey, int] = {}  # where a record of an arena lies (shared)
        self._pins: dict[RecordKey, int] = {}
        self._retired: dict[RecordKey, Payload] = {}  # evicted while pinned: freed at the last unpin
        self._arena_ids = itertools.count(1)  # never 0 (no arena on the wire), never reused
        self.on_arena_closed: Callable[[int], None] | None = None
        """Called (under the lock, from any thread) with an arena's number once it is freed."""
        self._stats: dict[RecordKey, RecordStats] = {}
        self._heap: list[tuple[Priority, int, RecordKey]] = []
        self._token: dict[RecordKey, int] = {}  # heap entry that is current for a cached record
        self._tokens = itertools.count()
        self._clock = itertools.count(1)
        self._used = 0
        # Objects are numbered once per call, so that a record's key hashes in C: an ObjectKey
        # hashes in Python (a dataclass), which twice per record cost more than the record's copy
        # out on the shared-memory path.
        self._numbers: dict[ObjectId, int] = {}
        self._objects: dict[int, ObjectId] = {}
        self._next_number = itertools.count()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def entries(self) -> int:
        """Records held now."""
        return len(self._data)

    def lookup(self, obj: ObjectId, region: str, indices: Sequence[int]) -> list[bytes | None]:
        """Cached payloads of ``indices`` (``None`` for a miss) as ``bytes`` copies; counts an
        access to each. (:meth:`lookup_pinned` hands out views without a copy.)"""
        found, pin = self.lookup_pinned(obj, region, indices)
        try:
            return [None if d is None else bytes(d) for d in found]
        finally:
            pin.release()

    def lookup_pinned(self, obj: ObjectId, region: str,
                      indices: Sequence[int]) -> tuple[list[Payload | None], Pin]:
        """Cached payloads of ``indices`` (``None`` for a miss), counting an access to each, and the
        pin that keeps them valid: release it once the payloads are used (copied or sent)."""
        if not self.enabled:
            return [None] * len(indices), NO_PIN
        found: list[Payload | None] = []
        pinned: list[RecordKey] = []
        with self._lock:
            number = self._number(obj)
            for index in indices:
                rk = (number, region, index)
                stats = self._touch(rk)
                stats.frequency += 1
                stats.last_access = next(self._clock)
                data = self._data.get(rk)  # its heap entry is re-ranked when it surfaces
                found.append(data)
                if data is not None and self.shared:
                    self._pins[rk] = self._pins.get(rk, 0) + 1
                    pinned.append(rk)
        hits = sum(d is not None for d in found)
        self._counters.add(dram_hits=hits, dram_misses=len(found) - hits)
        return found, Pin(self, pinned) if pinned else NO_PIN

    def admit(self, obj: ObjectId, region: str, records: Sequence[tuple[int, memoryview]],
              offsets: Sequence[int] | None = None, object_bytes: int = 0) -> int:
        """Offer records read from disk; copies and keeps those the eviction rule admits; returns how many.

        A ``shared`` cache needs each record's file ``offsets`` (parallel to ``records``) and the
        object's data file size, ``object_bytes``: the record is kept at that offset of the
        object's arena."""
        if not self.enabled:
            return 0
        if self.shared and (offsets is None or len(offsets) != len(records) or object_bytes <= 0):
            raise ValueError("a shared DRAM cache admits records with their file offsets and the object's size")
        admitted = rejected = evicted = 0
        with self._lock:
            number = self._number(obj)
            arena = self._arenas.get(number)
            if self.shared and arena is None:
                try:
                    arena = self._arenas[number] = Arena(next(self._arena_ids), object_bytes)
                except OSError:  # out of descriptors or memory maps: this object is not cached for now
                    self._counters.add(dram_rejections=len(records))
                    return 0
            if arena is not None:
                arena.records += 1  # held while admitting: evicting its last record must not free it now
            try:
                for k, (index, payload) in enumerate(records):
                    rk = (number, region, index)
                    if rk in self._data:
                        continue
                    stats = self._touch(rk)
                    if rk in self._retired:  # evicted but still pinned: its bytes are there, counted
                        self._data[rk] = self._retired.pop(rk)
                        self._push(rk, stats)
                        admitted += 1
                        continue
                    room = self._make_room(len(payload), self._priority(stats))
                    if room is None:
                        rejected += 1
                        continue
                    evicted += room
                    if arena is not None:
                        assert offsets is not None
                        self._data[rk] = arena.put(offsets[k], payload)
                        arena.records += 1
                        self._offsets[rk] = offsets[k]
                    else:
                        self._data[rk] = bytes(payload)
                    self._used += len(payload)
                    self._push(rk, stats)
                    admitted += 1
            finally:
                if arena is not None:
                    arena.records -= 1
                    if arena.records == 0:  # nothing of the object is in it (nothing came in, or all left)
                        self._close_arena(number)
        self._counters.add(dram_evictions=evicted, dram_rejections=rejected)
        return admitted

    def arena(self, obj: ObjectId) -> Arena | None:
        """The arena holding ``obj``'s records (shared caches, once one was admitted)."""
        with self._lock:
            number = self._numbers.get(obj)
            return None if number is None else self._arenas.get(number)

    @property
    def retired_bytes(self) -> int:
        """Bytes of evicted records still pinned (counted in :attr:`used_bytes`)."""
        with self._lock:
            return sum(len(d) for d in self._retired.values())

    def _unpin(self, keys: Sequence[RecordKey]) -> None:
        with self._lock:
            for rk in keys:
                left = self._pins[rk] - 1
                if left:
                    self._pins[rk] = left
                    continue
                del self._pins[rk]
                if rk in self._retired:
                    self._free(rk, self._retired.pop(rk))

    def report(self, obj: ObjectId, region: str, indices: Sequence[int],
               attention: Sequence[float], important: Sequence[float] | None) -> int:
        """Add observed attention (and important fractions) to records; returns how many."""
        if not self.enabled:
            return 0
        with self._lock:
            number = self._number(obj)
            for k, index in enumerate(indices):
                rk = (number, region, index)
                stats = self._touch(rk)
                stats.attention += attention[k]
                if important is not None:
                    stats.important_sum += important[k]
                    stats.reports += 1
                if rk in self._data:
                    self._push(rk, stats)
        return len(indices)

    def drop_object(self, key: ObjectKey) -> None:
        """Forget every record and stat of every commit of ``key`` (it was deleted)."""
        with self._lock:
            numbers = {n for n, obj in self._objects.items() if obj[0] == key}
            for rk in [rk for rk in self._stats if rk[0] in numbers]:
                del self._stats[rk]
                self._forget(rk)
            for n in numbers:
                del self._numbers[self._objects.pop(n)]

    def stats_of(self, obj: ObjectId, region: str, index: int) -> RecordStats | None:
        """A copy of one record's stats (for tests and debugging)."""
        with self._lock:
            number = self._numbers.get(obj)
            stats = None if number is None else self._stats.get((number, region, index))
            return None if stats is None else RecordStats(**{
                f: getattr(stats, f) for f in RecordStats.__slots__})  # type: ignore[attr-defined]

    def contains(self, obj: ObjectId, region: str, index: int) -> bool:
        with self._lock:
            number = self._numbers.get(obj)
            return number is not None and (number, region, index) in self._data

    # -- with the lock held -------------------------------------------------------------------

    def _number(self, obj: ObjectId) -> int:
        number = self._numbers.get(obj)
        if number is None:
            number = self._numbers[obj] = next(self._next_number)
            self._objects[number] = obj
        return number

    def _touch(self, rk: RecordKey) -> RecordStats:
        stats = self._stats.get(rk)
        if stats is None:
            if len(self._stats) >= MAX_TRACKED + len(self._data):
                self._stats = {k: s for k, s in self._stats.items() if k in self._data}
            stats = self._stats[rk] = RecordStats()
        return stats

    def _push(self, rk: RecordKey, stats: RecordStats) -> None:
        token = next(self._tokens)
        self._token[rk] = token
        heapq.heappush(self._heap, (self._priority(stats), token, rk))
        if len(self._heap) > 4 * len(self._data) + 1024:
            self._heap = [(self._priority(self._stats[k]), t, k) for k, t in self._token.items()]
            heapq.heapify(self._heap)

    def _make_room(self, size: int, priority: Priority) -> int | None:
        """Evict lower-priority records until ``size`` fits; ``None`` if it cannot (nothing evicted)."""
        if size > self.budget_bytes:
            return None
        victims: list[tuple[Priority, int, RecordKey]] = []
        free = self.budget_bytes - self._used
        while free < size:
            entry = self._pop_lowest()
            if entry is None or entry[0] >= priority:
                for kept in (*victims, *([entry] if entry else [])):
                    heapq.heappush(self._heap, kept)
                return None
            victims.append(entry)
            if entry[2] not in self._pins:  # a pinned victim is retired: its bytes stay counted
                free += len(self._data[entry[2]])
        for _, _, rk in victims:
            self._forget(rk)
        return len(victims)

    def _pop_lowest(self) -> tuple[Priority, int, RecordKey] | None:
        """Pop the current heap entry of lowest priority, dropping stale ones on the way and putting
        back, re-ranked, those whose record's priority rose since they were pushed."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            rk = entry[2]
            if self._token.get(rk) != entry[1]:
                continue
            current = self._priority(self._stats[rk])
            if current > entry[0]:
                heapq.heappush(self._heap, (current, entry[1], rk))
                continue
            return entry
        return None

    def _forget(self, rk: RecordKey) -> None:
        data = self._data.pop(rk, None)
        self._token.pop(rk, None)
        if data is None:
            return
        if rk in self._pins:
            self._retired[rk] = data
        else:
            self._free(rk, data)

    def _free(self, rk: RecordKey, data: Payload) -> None:
        """A record no longer cached nor pinned: its budget, and its arena pages, go back."""
        self._used -= len(data)
        offset = self._offsets.pop(rk, None)
        if offset is not None:
            arena = self._arenas[rk[0]]
            arena.free(offset, len(data))
            arena.records -= 1
            if arena.records == 0:
                self._close_arena(rk[0])

    def _close_arena(self, number: int) -> None:
        """Free object ``number``'s arena: none of its records is cached or retired any more (evicted,
        or the object deleted). A later admission makes a new one, under a new arena number."""
        arena = self._arenas.pop(number)
        arena.close()
        if self.on_arena_closed is not None:
            self.on_arena_closed(arena.number)
