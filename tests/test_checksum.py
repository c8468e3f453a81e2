"""The record checksum is zlib's CRC-32, whichever library computes it (stored checksums stay valid)."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, strategies as st

from contiguouskv.common import checksum


@given(st.binary(max_size=70_000), st.integers(0, 4096))
def test_same_values_as_zlib_on_bytes_and_views(data: bytes, start: int) -> None:
    view = memoryview(bytearray(data))[start:]
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(view) == zlib.crc32(view)


def test_the_fast_implementation_is_installed() -> None:
    assert checksum._crc32.__module__.startswith("zlib_ng"), checksum._crc32.__module__


@given(st.integers(1, 9000), st.integers(0, 12), st.data())
def test_first_bad_record_finds_the_first_corrupted_record(size: int, count: int, data: st.DataObject) -> None:
    records = [data.draw(st.binary(min_size=size, max_size=size)) for _ in range(count)]
    expected = [zlib.crc32(r) for r in records]
    buffer = bytearray(b"".join(records))
    assert checksum.first_bad_record(buffer, size, expected) is None
    if not count:
        return
    bad = sorted(data.draw(st.sets(st.integers(0, count - 1), min_size=1)))
    for k in bad:  # one flipped bit per corrupted record
        bit = data.draw(st.integers(0, 8 * size - 1))
        buffer[k * size + bit // 8] ^= 1 << (bit % 8)
    assert checksum.first_bad_record(memoryview(buffer), size, expected) == bad[0]


def test_first_bad_record_refuses_a_length_that_is_not_whole_records() -> None:
    with pytest.raises(ValueError, match="not 2 records of 4"):
        checksum.first_bad_record(b"123456789", 4, [0, 0])
