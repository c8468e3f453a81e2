"""The DRAM cache's shared arenas (plain objects, no server): records at their file offsets in a
sealed memfd, pins that keep an evicted record's bytes until released, and the budget honoured
with retired records counted. The plane that hands arenas to clients is tested in test_shm_plane.py."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contiguouskv.cache_server.dram_arena import PAGE, Arena, arenas_supported
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.stats import Counters

pytestmark = pytest.mark.skipif(not arenas_supported(), reason="needs Linux memfd sealing and /proc")

OBJ = (ObjectKey("p", "l"), 1.0)
SIZE = 5000  # a record of two pages and a bit: its stride is 3 pages
STRIDE = 3 * PAGE
RECORDS = 16


def payload(index: int) -> bytes:
    return bytes([(index * 7 + k) % 251 for k in range(SIZE)])


def shared_cache(records: int = 3) -> DramCache:
    cache = DramCache(records * SIZE, "lru", Counters(), shared=True)
    assert cache.shared
    return cache


def admit(cache: DramCache, indices: list[int], obj: tuple = OBJ) -> int:
    """Ask for ``indices`` (an access each: the newest are the most recent), then offer them."""
    cache.lookup(obj, "r", indices)
    return cache.admit(obj, "r", [(i, memoryview(payload(i))) for i in indices], [i * STRIDE for i in indices],
                       RECORDS * STRIDE)


def read_only_map(arena: Arena) -> mmap.mmap:
    fd = arena.reader_fd()
    try:
        return mmap.mmap(fd, arena.size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def test_an_arena_frees_one_record_s_pages_and_keeps_its_neighbours() -> None:
    arena = Arena(1, 4 * STRIDE)
    for i in range(4):
        arena.put(i * STRIDE, payload(i))
    seen = read_only_map(arena)
    arena.free(STRIDE, SIZE)
    assert seen[STRIDE : STRIDE + SIZE] == bytes(SIZE)  # freed: the kernel's zero pages
    for i in (0, 2, 3):
        assert seen[i * STRIDE : i * STRIDE + SIZE] == payload(i)
    with pytest.raises(ValueError, match="page-aligned"):
        arena.put(100, b"x")
    with pytest.raises(ValueError, match="page-aligned"):
        arena.put(3 * STRIDE, bytes(STRIDE + 1))  # past the end
    arena.close()


def test_a_client_s_descriptor_can_neither_write_nor_resize_the_arena() -> None:
    arena = Arena(1, 2 * STRIDE)
    arena.put(0, payload(0))
    fd = arena.reader_fd()
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, arena.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    with pytest.raises(PermissionError):  # sealed: not even the server's own descriptor resizes it
        os.ftruncate(arena.fd, 0)
    arena.close()


def test_hits_are_views_into_the_arena_and_plain_lookups_are_copies() -> None:
    cache = shared_cache()
    assert admit(cache, [0, 5]) == 2
    found, pin = cache.lookup_pinned(OBJ, "r", [5, 1, 0])
    assert found[1] is None and bytes(found[0]) == payload(5) and bytes(found[2]) == payload(0)
    assert isinstance(found[0], memoryview) and found[0].readonly and pin.records == 2
    arena = cache.arena(OBJ)
    assert arena is not None and arena.number >= 1  # 0 would mean "no arena" on the wire
    seen = read_only_map(arena)
    assert seen[5 * STRIDE : 5 * STRIDE + SIZE] == payload(5)  # at its file offset
    pin.release()
    pin.release()  # idempotent
    copies = cache.lookup(OBJ, "r", [0])
    assert isinstance(copies[0], bytes) and copies[0] == payload(0)


def test_an_evicted_record_still_pinned_keeps_its_bytes_and_its_budget_until_released() -> None:
    cache = shared_cache(records=2)
    admit(cache, [0, 1])
    found, pin = cache.lookup_pinned(OBJ, "r", [0])  # 0 is now the most recent: 1 goes first
    admit(cache, [2])  # evicts 1 (unpinned): freed at once
    assert not cache.contains(OBJ, "r", 1) and cache.used_bytes == 2 * SIZE
    admit(cache, [3])  # evicts 0, which is pinned: retired, still counted, so 3 needs 2 gone too
    assert not cache.contains(OBJ, "r", 0) and cache.retired_bytes == SIZE
    assert cache.used_bytes <= cache.budget_bytes
    assert bytes(found[0]) == payload(0)  # the pinned view still reads the record
    seen = read_only_map(cache.arena(OBJ))  # type: ignore[arg-type]
    pin.release()
    assert cache.retired_bytes == 0 and seen[0:SIZE] == bytes(SIZE)  # freed at the last release
    assert cache.used_bytes == SIZE * sum(cache.contains(OBJ, "r", i) for i in range(4))


def test_a_retired_record_admitted_again_is_kept_without_a_copy() -> None:
    cache = shared_cache(records=2)
    admit(cache, [0])
    _, pin = cache.lookup_pinned(OBJ, "r", [0])
    admit(cache, [1])
    admit(cache, [2])  # evicts 0 (pinned: retired, its room not freed) and 1
    assert cache.retired_bytes == SIZE and not cache.contains(OBJ, "r", 0) and cache.contains(OBJ, "r", 2)
    assert cache.used_bytes == 2 * SIZE
    cache.admit(OBJ, "r", [(0, memoryview(bytes(SIZE)))], [0], RECORDS * STRIDE)  # not written again
    assert cache.contains(OBJ, "r", 0) and cache.retired_bytes == 0 and cache.used_bytes == 2 * SIZE
    pin.release()
    found, again = cache.lookup_pinned(OBJ, "r", [0])
    assert bytes(found[0]) == payload(0)  # kept: the release freed nothing, and the bytes are the first


def test_a_deleted_object_s_arena_is_freed_after_its_last_pin_and_announced() -> None:
    cache = shared_cache()
    closed: list[int] = []
    cache.on_arena_closed = closed.append
    admit(cache, [0, 1])
    arena = cache.arena(OBJ)
    assert arena is not None
    found, pin = cache.lookup_pinned(OBJ, "r", [1])
    cache.drop_object(OBJ[0])
    assert closed == [] and not arena.closed and bytes(found[1 - 1]) == payload(1)
    pin.release()
    assert closed == [arena.number] and arena.closed and cache.used_bytes == 0
    stored_again = (OBJ[0], 2.0)  # the prefix stored again: a new object, a new arena
    admit(cache, [0], stored_again)
    assert cache.arena(stored_again).number != arena.number  # type: ignore[union-attr]


def test_a_shared_cache_needs_offsets() -> None:
    cache = shared_cache()
    with pytest.raises(ValueError, match="file offsets"):
        cache.admit(OBJ, "r", [(0, memoryview(payload(0)))])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "pin", "release", "drop"]),
                          st.lists(st.integers(0, RECORDS - 1), min_size=1, max_size=4)), max_size=40))
def test_pinned_views_never_change_and_the_budget_holds(steps: list[tuple[str, list[int]]]) -> None:
    cache = shared_cache(records=4)
    pins: list[tuple[list, object, list[int]]] = []
    commit = 1.0
    for op, indices in steps:
        obj = (OBJ[0], commit)
        if op == "admit":
            cache.lookup(obj, "r", indices)
            admit(cache, sorted(set(indices)), obj)
        elif op == "pin":
            found, pin = cache.lookup_pinned(obj, "r", indices)
            pins.append((found, pin, indices))
        elif op == "release" and pins:
            pins.pop(0)[1].release()  # type: ignore[attr-defined]
        elif op == "drop":
            cache.drop_object(OBJ[0])
            commit += 1.0
        assert cache.used_bytes <= cache.budget_bytes
        for found, _, asked in pins:  # whatever was evicted or deleted meanwhile
            for index, view in zip(asked, found):
                assert view is None or bytes(view) == payload(index)
    for _, pin, _ in pins:
        pin.release()  # type: ignore[attr-defined]
    assert cache.retired_bytes == 0
    live = sum(cache.contains((OBJ[0], commit), "r", i) for i in range(RECORDS))
    assert cache.used_bytes == live * SIZE


def test_an_object_s_arena_is_freed_when_its_last_record_is_evicted_and_a_new_one_made_after() -> None:
    cache = shared_cache(records=1)
    closed: list[int] = []
    cache.on_arena_closed = closed.append
    other = (ObjectKey("q", "l"), 1.0)
    admit(cache, [0])
    first = cache.arena(OBJ)
    assert first is not None
    admit(cache, [1])  # evicts OBJ's only record, for one of the same object: the arena stays
    assert cache.arena(OBJ) is first and cache.contains(OBJ, "r", 1) and closed == []
    admit(cache, [2], other)  # evicts OBJ's last record: its arena goes
    assert closed == [first.number] and first.closed and cache.arena(OBJ) is None
    others = cache.arena(other)
    assert others is not None
    admit(cache, [3])  # evicts the other object's only record: that arena goes too
    again = cache.arena(OBJ)
    assert closed == [first.number, others.number] and cache.arena(other) is None
    assert again is not None and again.number not in (first.number, others.number)  # numbers are never reused
    assert bytes(cache.lookup(OBJ, "r", [3])[0] or b"") == payload(3)


def test_an_arena_that_cannot_be_made_leaves_the_object_uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    from contiguouskv.cache_server import dram_cache

    def out_of_descriptors(*_: object) -> Arena:
        raise OSError(24, "Too many open files")

    cache = shared_cache()
    monkeypatch.setattr(dram_cache, "Arena", out_of_descriptors)
    assert admit(cache, [0, 1]) == 0 and cache.used_bytes == 0 and cache.arena(OBJ) is None
    monkeypatch.undo()
    assert admit(cache, [0, 1]) == 2  # served again once descriptors are back
