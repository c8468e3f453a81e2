"""The shared-memory data plane's control socket: messages, limits and peer checks (both sides).

A compute server on the cache server's node opens a *plane*: it creates a shared buffer (a
``memfd`` of ``slots`` x ``slot_bytes``), connects to the cache server's Unix socket
(``SOCK_SEQPACKET``, one message per datagram) and sends ``hello`` with the buffer's descriptor
attached (``SCM_RIGHTS``). The server checks the peer's credentials (``SO_PEERCRED``: the same uid
as its own), maps the buffer and answers ``welcome`` with a plane id, a random token the client
then names in ``FetchOpen.shm_plane``; the Fetch call itself still passes the server's token and
scope checks, so the socket only adds a path for bytes, never a way around authorisation.

On a stream opened with a plane, the server writes each batch's payloads into a free slot and
sends only a ``ShmSlice`` descriptor (slot, offset, length, per-record CRC-32) over gRPC. The slot
is then the client's: the server does not touch it again until the client gives it back with
``release`` (slot by slot, as the records are used) or ``end`` (the stream is over; every slot lent
to it that is not in ``holding`` is free again, including slots whose descriptors never arrived).
The client never writes to the buffer. Closing the socket (or the death of either process) ends
the plane: the server forgets it, and the memory goes away with the last mapping (a ``memfd`` has
no name to leak).

DRAM hits go without a copy. The server keeps each object's cached records in an *arena*, a sealed
``memfd`` mirroring the object's data file. The first time a stream's batch is wholly in an arena,
the server sends ``arena`` (its number and size) with a read-only descriptor of it attached; the
client maps it ``PROT_READ``. The batch's ``ShmSlice`` then names the arena, each record's offset
and a *lease*: the server keeps those records' pages (an eviction waits) until the client gives the
lease back with ``unpin``, or ``end`` of its stream omits it from ``leases``. When the object is
deleted and no lease holds any of its records, the server frees the arena and sends ``forget``; the
client unmaps it. The server sends only arenas of objects the client opened with a Fetch call that
passed the server's checks.

Messages are small JSON objects; a message the receiver cannot parse ends the plane.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

MAX_MESSAGE = 64 << 10
MAX_PLANE_BYTES = 64 << 30
PAGE = 4096
HELLO, WELCOME, ERROR, RELEASE, END = "hello", "welcome", "error", "release", "end"
ARENA, FORGET, UNPIN = "arena", "forget", "unpin"
MAX_ID = 1 << 62  # arena numbers and lease ids are below this


class ProtocolError(ValueError):
    """A control message that breaks the protocol; the plane ends."""


def encode(op: str, **fields: Any) -> bytes:
    """One control message."""
    message = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
    if len(message) > MAX_MESSAGE:
        raise ProtocolError(f"{op}: message of {len(message)} bytes, more than {MAX_MESSAGE}")
    return message


def decode(message: bytes) -> dict[str, Any]:
    """A control message as a dict with ``op``; ``ProtocolError`` if it is not one."""
    try:
        value = json.loads(message)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"unparsable control message: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise ProtocolError("control message without an op")
    return value


def int_field(message: dict[str, Any], name: str, low: int = 0, high: int = 1 << 62) -> int:
    """``message[name]`` as an int in [low, high]; ``ProtocolError`` otherwise."""
    value = message.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{message.get('op')}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def int_list(message: dict[str, Any], name: str, high: int) -> list[int]:
    """``message[name]`` as a list of ints in [0, high)."""
    value = message.get(name)
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < high for v in value):
        raise ProtocolError(f"{message.get('op')}: {name} must be a list of integers in [0, {high})")
    return value


def check_geometry(slots: int, slot_bytes: int) -> None:
    """``ProtocolError`` unless the buffer is at least 2 slots of whole pages within the size limit."""
    if slots < 2 or slot_bytes < PAGE or slot_bytes % PAGE or slots * slot_bytes > MAX_PLANE_BYTES:
        raise ProtocolError(f"buffer of {slots} slots of {slot_bytes} bytes: need >= 2 slots of whole "
                            f"4 KiB pages, at most {MAX_PLANE_BYTES} bytes in all")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
