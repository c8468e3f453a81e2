"""Linux native AIO (cache_server/native_aio.py): real O_DIRECT reads of a real file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import selectors
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv.cache_server.native_aio import NativeAio, open_native_aio

BLOCK = 4096


@pytest.fixture
def aio() -> Iterator[NativeAio]:
    context, why = open_native_aio(4)
    if context is None:
        pytest.skip(f"this kernel refuses native AIO: {why}")
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def data(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An O_DIRECT descriptor of a 64-block file, and the file's bytes."""
    payload = random.Random(5).randbytes(64 * BLOCK)
    path = tmp_path / "data"
    path.write_bytes(payload)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"no O_DIRECT on this filesystem: {exc}")
    try:
        yield fd, payload
    finally:
        os.close(fd)


@contextlib.contextmanager
def aligned(nbytes: int) -> Iterator[tuple[mmap.mmap, int]]:
    """A page-aligned buffer and its address (valid until the block ends)."""
    buffer = mmap.mmap(-1, nbytes)
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        yield buffer, ctypes.addressof(anchor)
    finally:
        del anchor
        buffer.close()


def wait_all(aio: NativeAio, pending: list, timeout: float = 10.0) -> dict[object, int]:
    """Submit ``pending`` reads as room allows and collect every result by token."""
    results: dict[object, int] = {}
    with selectors.DefaultSelector() as selector:
        selector.register(aio.fd, selectors.EVENT_READ)
        while pending or aio.busy:
            taken, refused = aio.submit(pending)
            del pending[:taken]
            results.update(refused)
            if aio.busy and not selector.select(timeout):
                raise TimeoutError("no completion signalled on the eventfd")
            results.update(aio.reap())
    return results


def test_reads_land_where_asked_with_more_reads_than_room(aio: NativeAio, data: tuple[int, bytes]) -> None:
    fd, payload = data
    order = list(range(16))
    random.Random(1).shuffle(order)
    with aligned(64 * BLOCK) as (buffer, base):
        # 16 reads of 4 blocks through a context with room for 4: block j of the file lands at slot k
        reads = [(fd, base + k * 4 * BLOCK, 4 * BLOCK, j * 4 * BLOCK, ("read", k, j)) for k, j in enumerate(order)]
        results = wait_all(aio, reads)
        assert results == {("read", k, j): 4 * BLOCK for k, j in enumerate(order)}
        for k, j in enumerate(order):
            assert buffer[k * 4 * BLOCK : (k + 1) * 4 * BLOCK] == payload[j * 4 * BLOCK : (j + 1) * 4 * BLOCK]
    assert aio.room == 4 and aio.busy == 0


def test_reads_at_and_past_the_end_come_back_short(aio: NativeAio, data: tuple[int, bytes]) -> None:
    fd, payload = data
    with aligned(8 * BLOCK) as (buffer, base):
        results = wait_all(aio, [(fd, base, 4 * BLOCK, 62 * BLOCK, "straddles"),
                                 (fd, base + 4 * BLOCK, 4 * BLOCK, 64 * BLOCK, "past")])
        assert results == {"straddles": 2 * BLOCK, "past": 0}
        assert buffer[: 2 * BLOCK] == payload[62 * BLOCK :]


def test_refused_reads_are_reported_with_their_error(aio: NativeAio, data: tuple[int, bytes]) -> None:
    fd, payload = data
    unused = os.sysconf("SC_OPEN_MAX") - 1  # a descriptor number nobody holds
    with pytest.raises(OSError):
        os.fstat(unused)
    with aligned(4 * BLOCK) as (buffer, base):
        results = wait_all(aio, [(unused, base, BLOCK, 0, "bad fd"),
                                 (fd, base + 1, BLOCK, 0, "misaligned"),  # O_DIRECT needs aligned memory
                                 (fd, base + BLOCK, BLOCK, 3 * BLOCK, "good")])
        assert results == {"bad fd": -errno.EBADF, "misaligned": -errno.EINVAL, "good": BLOCK}
        assert buffer[BLOCK : 2 * BLOCK] == payload[3 * BLOCK : 4 * BLOCK]
    assert aio.room == 4
