"""Raw-bytes encoding of ``FetchResponse`` messages, byte-compatible with the protobuf schema.

Fetch responses carry up to ~1 MiB of record payload. Building them as protobuf messages copies
the payload into the message, again when serializing, and the receiver copies it out once more.
Here the server builds the serialized message itself, in the read thread: the small fields are
serialized by protobuf, then field 4 (``data``) is appended as a tag, a length and the payload
pieces, joined with one copy straight from the aligned read buffer (or the DRAM cache). Protobuf
accepts fields in any order, so any ``FetchResponse`` parser reads these messages.

:func:`decode_fetch_response` is the matching fast parser for clients: it scans the top-level
fields, parses the small ones with protobuf and returns the payload as a zero-copy ``memoryview``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from contiguouskv.v1 import cache_pb2 as pb

# Channel options for a client that receives Fetch data (the compute server, the storage bench).
# grpc's Python receive path copies a message out slice by slice (a ``bytes`` per slice, appended
# to a ``bytearray``, then ``bytes()`` of it); 1 MiB HTTP/2 frames and socket reads make those
# slices ~1 MiB instead of 16 KiB. Measured on a bare stream of 1 MiB messages, 5 runs each,
# interleaved: 1.63 GB/s median and 0.62 client CPU-s/GB, against 1.31 and 0.78 (docs/storage.md).
BULK_RECEIVE_OPTIONS = [
    ("grpc.http2.max_frame_size", 1 << 20),
    ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
]
DATA_FIELD = 4
_DATA_KEY = bytes([DATA_FIELD << 3 | 2])  # field 4, wire type 2 (length-delimited)
BytesLike = bytes | bytearray | memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_fetch_response(
    tag: int, region: str, indices: Sequence[int], payloads: Sequence[BytesLike], done: bool,
    cancelled: bool = False, error_code: int = 0, error_message: str = "",
) -> tuple[bytes, int]:
    """A serialized ``FetchResponse`` whose ``data`` is ``payloads`` joined; and data's offset."""
    head = pb.FetchResponse(tag=tag, region=region, indices=indices, done=done, cancelled=cancelled,
                            error_code=error_code, error_message=error_message).SerializeToString()
    size = sum(len(p) for p in payloads)
    if not size:
        return head, len(head)
    prefix = head + _DATA_KEY + _varint(size)
    return b"".join((prefix, *payloads)), len(prefix)


def encode_fetch_descriptor(tag: int, region: str, indices: Sequence[int], done: bool, slot: int, length: int,
                            crcs: bytes) -> bytes:
    """A serialized ``FetchResponse`` whose payloads lie in shared-memory ``slot`` (``ShmSlice``)."""
    return pb.FetchResponse(tag=tag, region=region, indices=indices, done=done,
                            shm=pb.ShmSlice(slot=slot, offset=0, length=length, crc32=crcs)).SerializeToString()


def encode_arena_descriptor(tag: int, region: str, indices: Sequence[int], done: bool, arena: int, lease: int,
                            offsets: Sequence[int], record_size: int, crcs: bytes) -> bytes:
    """A serialized ``FetchResponse`` whose payloads are DRAM hits in the server's ``arena``, held
    under ``lease``: record k at ``offsets[k]`` (``ShmSlice`` with ``arena``)."""
    return pb.FetchResponse(tag=tag, region=region, indices=indices, done=done, shm=pb.ShmSlice(
        length=len(indices) * record_size, crc32=crcs, arena=arena, lease=lease, offsets=offsets)).SerializeToString()


def serialize_fetch_response(message: bytes | pb.FetchResponse) -> bytes:
    """gRPC response serializer of Fetch: prebuilt bytes pass through, messages are serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


@dataclasses.dataclass(frozen=True, slots=True)
class ShmRef:
    """Where a batch's payloads lie in the receiver's shared buffer (``ShmSlice``)."""

    slot: int
    offset: int
    length: int
    crcs: bytes  # one little-endian CRC-32 per record
    arena: int = 0  # non-zero: DRAM hits in that server arena, record k at offsets[k]
    lease: int = 0  # the server's hold on an arena batch
    offsets: tuple[int, ...] = ()


class Lease(Protocol):
    """A hold on the shared memory under a batch's ``data``: give it back once the records are used."""

    def release(self) -> None: ...


@dataclasses.dataclass(slots=True)
class FetchBatch:
    """A decoded ``FetchResponse``; ``data`` is a read-only view into the received bytes.

    On a shared-memory stream ``shm`` says where the payloads are; the stream then points ``data``
    at them (checked) and sets ``lease``, which whoever keeps ``data`` releases when done with it.
    """

    tag: int
    region: str
    indices: list[int]
    data: memoryview
    done: bool
    cancelled: bool
    error_code: int
    error_message: str
    shm: ShmRef | None = None
    lease: Lease | None = None


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed FetchResponse: varint too long")


def decode_fetch_response(raw: bytes) -> FetchBatch:
    """Parse a serialized ``FetchResponse`` without copying its payload; ``ValueError`` if malformed."""
    view = memoryview(raw)
    data = view[:0]
    header: list[bytes] = []
    pos, end = 0, len(raw)
    try:
        while pos < end:
            start = pos
            key, pos = _read_varint(raw, pos)
            kind = key & 7
            if kind == 0:
                _, pos = _read_varint(raw, pos)
            elif kind == 2:
                length, pos = _read_varint(raw, pos)
                if key >> 3 == DATA_FIELD:
                    data = view[pos : pos + length]
                    pos += length
                    continue
                pos += length
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            else:
                raise ValueError(f"malformed FetchResponse: wire type {kind}")
            header.append(raw[start:pos])
    except IndexError:
        raise ValueError("malformed FetchResponse: truncated") from None
    if pos != end:
        raise ValueError("malformed FetchResponse: truncated")
    m = pb.FetchResponse.FromString(b"".join(header))
    shm = (ShmRef(m.shm.slot, m.shm.offset, m.shm.length, m.shm.crc32, m.shm.arena, m.shm.lease,
                  tuple(m.shm.offsets)) if m.HasField("shm") else None)
    return FetchBatch(m.tag, m.region, list(m.indices), data, m.done, m.cancelled, m.error_code,
                      m.error_message, shm)
