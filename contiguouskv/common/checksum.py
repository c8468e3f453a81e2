"""The record checksum: CRC-32 (the zlib polynomial), computed with zlib-ng's SIMD code.

zlib-ng computes the same CRC-32 as :func:`zlib.crc32` at 10-25 GB/s on this project's machine
against 3-4 GB/s for the system zlib. Without the package (a machine where only the core wheels
are installed) the standard library's zlib gives the same values, slower; stored checksums are the
same either way.

Both release the GIL for buffers over 5 KiB, and the read threads that verify records run beside
the event loop that serves them: every release is a GIL hand-off, a futex wake-up and often a
context switch, which cost far more than checksumming 32 KiB. So :func:`crc32` feeds a record in
pieces of at most :data:`PIECE` bytes, chaining the CRC, and keeps the GIL (measured with the
storage bench: the server's CPU for a 0.4 GB Fetch fell from 1.7 s to about the 1.3 s it takes
with no checksum at all; docs/storage.md).
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from zlib_ng.zlib_ng import crc32 as _crc32
    from zlib_ng.zlib_ng import crc32_combine as _crc32_combine
except ImportError:  # pragma: no cover - zlib-ng is a dependency; kept for minimal installs
    from zlib import crc32 as _crc32
    _crc32_combine = None

PIECE = 5 * 1024  # the largest buffer zlib and zlib-ng checksum without releasing the GIL

__all__ = ["PIECE", "crc32", "crc32_any_size", "first_bad_record"]

crc32_any_size = _crc32
"""The same CRC-32 in one call, releasing the GIL for large buffers: for threads that share their
process with no event loop (the read helpers, :mod:`.read_process`)."""


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 of ``data``, equal to :func:`zlib.crc32`, computed without releasing the GIL."""
    if len(data) <= PIECE:
        return _crc32(data)
    view = memoryview(data).cast("B")
    value = 0
    for start in range(0, len(view), PIECE):
        value = _crc32(view[start:start + PIECE], value)
    return value


def first_bad_record(data: bytes | bytearray | memoryview, size: int, expected: Sequence[int]) -> int | None:
    """Index of the first of the back-to-back ``size``-byte records in ``data`` whose CRC-32 is not
    ``expected[k]``, or ``None`` when all match.

    One CRC-32 of the whole buffer (releasing the GIL once, not once per record) is compared with the
    records' expected CRC-32s combined (``crc32_combine``: the CRC of a concatenation from its
    parts' CRCs); only on a mismatch is each record checked, to name the bad one. Half the CPU of a
    record-by-record check for 32 KiB records (docs/storage.md).
    """
    view = memoryview(data).cast("B")
    if len(view) != size * len(expected):
        raise ValueError(f"{len(view)} bytes are not {len(expected)} records of {size}")
    if _crc32_combine is not None and expected:
        combined = expected[0]
        for crc in expected[1:]:
            combined = _crc32_combine(combined, crc, size)
        if _crc32(view) == combined:
            return None
    for k, crc in enumerate(expected):
        if crc32(view[k * size : (k + 1) * size]) != crc:
            return k
    return None
