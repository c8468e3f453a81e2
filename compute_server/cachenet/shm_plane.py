"""The compute server's side of the shared-memory data plane (protocol: :mod:`contiguouskv.common.shm_protocol`).

:meth:`ShmPlane.connect` creates the shared buffer (an anonymous ``memfd``, so a crash leaks
nothing), connects to the co-located cache server's socket, checks that the server runs as this
process's uid (``SO_PEERCRED``) and hands it the buffer. Each Fetch stream opened on the plane gets
a :class:`PlaneStreamState` (:meth:`ShmPlane.stream`); every ``ShmSlice`` descriptor arriving on it
is checked (:meth:`PlaneStreamState.receive`: the slot is in range, not already held, the length is
whole records, every record's CRC-32 matches) before its bytes are used, and becomes a
:class:`SlotLease` that gives the slot back when released; while more than half of the slots are
held, a batch is copied out instead and its slot given back at once. When the stream ends
(:meth:`PlaneStreamState.finish`) the server is told which slots are still held; every other slot
lent to the stream (descriptors that never arrived) is free again.

A batch's CRC-32s are checked in one pass over its bytes against the records' CRC-32s combined
(:func:`~contiguouskv.common.checksum.first_bad_record`): one release of the GIL per batch, where a
release for every record on the event loop would hand the GIL back and forth with the compute
thread, as it did between the cache server's read threads and its event loop.

Releases and ends may come from any thread (the compute thread releases a layer's records); the
socket carries one message per datagram, sent under a lock. The plane is *dead* once the socket
breaks: streams opened after that use gRPC bytes (``data_path`` auto) or fail (``shm``).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import select
import socket
import struct
import threading

from contiguouskv.common import shm_protocol as proto
from contiguouskv.common.checksum import first_bad_record
from contiguouskv.common.fetch_wire import FetchBatch

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0


class PlaneError(ValueError):
    """A descriptor that does not describe a slot this stream may read, or a failed checksum."""


class ShmPlane:
    """A shared buffer of ``slots`` x ``slot_bytes`` lent to one cache server over ``path``."""

    def __init__(self, path: str, sock: socket.socket, buffer: mmap.mmap, plane_id: str, slots: int,
                 slot_bytes: int) -> None:
        self.path = path
        self.id = plane_id
        self.slots, self.slot_bytes = slots, slot_bytes
        self._sock = sock
        self._buffer = buffer
        self._view = memoryview(buffer).toreadonly()
        self._lock = threading.Lock()
        self._streams = itertools.count(1)
        self._alive = True
        self._held = 0  # slots held by all streams together

    @classmethod
    def connect(cls, path: str, slots: int, slot_bytes: int) -> ShmPlane:
        """Open a plane with the cache server listening on ``path`` (blocking; ``OSError`` if it
        cannot: no server there, another uid, refused)."""
        proto.check_geometry(slots, slot_bytes)
        size = slots * slot_bytes
        fd = os.memfd_create("ckv-shm-plane", os.MFD_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(path)
            uid = proto.peer_uid(sock)
            if uid != os.getuid():
                raise OSError(f"shared-memory plane {path}: the server runs as uid {uid}, not {os.getuid()}")
            socket.send_fds(sock, [proto.encode(proto.HELLO, slots=slots, slot_bytes=slot_bytes)], [fd])
            answer = proto.decode(sock.recv(proto.MAX_MESSAGE) or b'{"op":"error","message":"closed"}')
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(fd)  # the mapping (and the server's) keep the memory
        if answer["op"] != proto.WELCOME or not isinstance(answer.get("plane"), str):
            sock.close()
            raise OSError(f"shared-memory plane {path} refused: {answer.get('message', answer)}")
        sock.settimeout(SEND_TIMEOUT_S)
        log.info("shared-memory plane %s on %s: %d slots of %d bytes", answer["plane"][:8], path, slots, slot_bytes)
        return cls(path, sock, buffer, answer["plane"], slots, slot_bytes)

    @property
    def alive(self) -> bool:
        """False once the socket broke (the server restarted or died) or :meth:`close` was called."""
        with self._lock:
            if self._alive:
                try:  # the server sends nothing after its welcome but an error before it closes
                    readable, _, _ = select.select([self._sock], [], [], 0)
                except (OSError, ValueError):
                    readable = [self._sock]
                if readable:
                    self._alive = False
                    self._sock.close()
            return self._alive

    def hold(self, delta: int) -> bool:
        """Count ``delta`` slots held (or given back); True while at most half the slots are held."""
        with self._lock:
            self._held += delta
            return self._held <= self.slots // 2

    def stream(self) -> PlaneStreamState:
        """A fresh stream id and its bookkeeping, for one Fetch stream."""
        return PlaneStreamState(self, next(self._streams))

    def slice(self, slot: int, offset: int, length: int) -> memoryview:
        """Read-only bytes [offset, offset + length) of ``slot``; ``PlaneError`` if out of range."""
        if not 0 <= slot < self.slots or offset < 0 or length < 0 or offset + length > self.slot_bytes:
            raise PlaneError(f"descriptor slot {slot} [{offset}, +{length}) is outside the buffer's "
                             f"{self.slots} slots of {self.slot_bytes} bytes")
        start = slot * self.slot_bytes + offset
        return self._view[start : start + length]

    def send(self, op: str, **fields: object) -> None:
        """Send one control message; a broken socket marks the plane dead (the server then frees
        everything of this plane by itself)."""
        message = proto.encode(op, **fields)
        with self._lock:
            if not self._alive:
                return
            try:
                self._sock.send(message)
            except OSError as exc:
                log.warning("shared-memory plane %s: %s failed (%s); the plane is closed", self.id[:8], op, str(exc))
                self._alive = False
                self._sock.close()

    def close(self) -> None:
        """End the plane: the server frees every slot; the buffer goes with its last view."""
        with self._lock:
            if self._alive:
                self._alive = False
                self._sock.close()


class PlaneStreamState:
    """The slots one Fetch stream received and still holds; thread-safe."""

    def __init__(self, plane: ShmPlane, stream_id: int) -> None:
        self.plane = plane
        self.id = stream_id
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._finished = False
        self.bytes_received = 0
        self.bytes_copied = 0  # of those, copied out of a slot because the buffer was more than half held

    def receive(self, batch: FetchBatch) -> FetchBatch:
        """Point ``batch.data`` at its checked records in shared memory and give it a lease.

        ``PlaneError`` when the descriptor is out of range, names a slot this stream already holds,
        or a record's CRC-32 does not match (the slot is given back then)."""
        ref = batch.shm
        assert ref is not None
        count = len(batch.indices)
        if count == 0 or ref.length % count or len(ref.crcs) != 4 * count:
            raise PlaneError(f"descriptor of {count} records, {ref.length} bytes and {len(ref.crcs)} "
                             f"checksum bytes does not describe whole records")
        data = self.plane.slice(ref.slot, ref.offset, ref.length)
        with self._lock:
            if ref.slot in self._held:
                raise PlaneError(f"descriptor names slot {ref.slot}, which this stream still holds")
            self._held.add(ref.slot)
        size = ref.length // count
        expected = struct.unpack(f"<{count}I", ref.crcs)
        bad = first_bad_record(data, size, expected)
        if bad is not None:
            with self._lock:  # not released: the stream fails, and its end frees the slot
                self._held.discard(ref.slot)
            raise PlaneError(f"checksum mismatch in shared memory: region {batch.region!r}, "
                             f"record {batch.indices[bad]} (slot {ref.slot})")
        self.bytes_received += ref.length
        if not self.plane.hold(1):
            # More than half the buffer is held (a request holds slots until its layers are done):
            # copy this batch out and give the slot back at once, so the server keeps a free slot
            # rather than falling back to bytes over gRPC. One copy, still none over the socket.
            batch.data = memoryview(bytearray(data))
            self.bytes_copied += ref.length
            self._give_back(ref.slot)
            return batch
        batch.data = data
        batch.lease = SlotLease(self, ref.slot)
        return batch

    def _give_back(self, slot: int) -> None:
        with self._lock:
            if slot not in self._held:
                return
            self._held.discard(slot)
        self.plane.hold(-1)
        self.plane.send(proto.RELEASE, stream=self.id, slots=[slot])

    def finish(self) -> None:
        """The stream is over: tell the server which slots are still held (the rest are free)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            holding = sorted(self._held)
        self.plane.send(proto.END, stream=self.id, holding=holding)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)


class SlotLease:
    """One received slot; :meth:`release` (idempotent, any thread) gives it back."""

    __slots__ = ("_state", "_slot", "_released")

    def __init__(self, state: PlaneStreamState, slot: int) -> None:
        self._state, self._slot, self._released = state, slot, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state._give_back(self._slot)
