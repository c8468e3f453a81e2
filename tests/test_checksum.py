"""The record checksum is zlib's CRC-32, whichever library computes it (stored checksums stay valid)."""

from __future__ import annotations

import zlib

from hypothesis import given, strategies as st

from contiguouskv.common import checksum


@given(st.binary(max_size=70_000), st.integers(0, 4096))
def test_same_values_as_zlib_on_bytes_and_views(data: bytes, start: int) -> None:
    view = memoryview(bytearray(data))[start:]
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(view) == zlib.crc32(view)


def test_the_fast_implementation_is_installed() -> None:
    assert checksum._crc32.__module__.startswith("zlib_ng"), checksum._crc32.__module__
