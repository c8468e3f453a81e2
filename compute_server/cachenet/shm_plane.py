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

DRAM hits come in place: the server sends an ``arena`` (a read-only descriptor of the DRAM cache's
shared memory for one object) over the socket before the first descriptor that names it; the
plane maps it ``PROT_READ`` (:meth:`ShmPlane.arena`, which reads the socket for it). Such a
descriptor lists each record's offset in the arena and a lease; its records are checked the same
way and handed on as one batch per run of adjacent records (:meth:`PlaneStreamState.receive`), all
parts sharing the lease, which goes back (``unpin``) when the last part is released.

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
import stat
import struct
import threading
import time

from contiguouskv.common import shm_protocol as proto
from contiguouskv.common.checksum import first_bad_record
from contiguouskv.common.fetch_wire import FetchBatch

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0
ARENA_WAIT_S = 2.0  # the server sends an arena on the local socket before the gRPC descriptor naming it


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
        self._arenas: dict[int, memoryview] = {}  # the server's DRAM arenas sent to this plane, mapped read-only

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
            self._read_messages(0.0)
            return self._alive

    def arena(self, number: int) -> memoryview:
        """The server's arena ``number``, mapped read-only; it was sent before the descriptor that
        names it, so the socket is read for it. ``PlaneError`` if
        it does not come within ``ARENA_WAIT_S``."""
        with self._lock:
            view = self._arenas.get(number)
            if view is None:
                self._read_messages(0.0)
                deadline = time.monotonic() + ARENA_WAIT_S
                while (view := self._arenas.get(number)) is None and self._alive:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._read_messages(left):
                        break
            if view is None:
                raise PlaneError(f"descriptor names arena {number}, which the server did not send")
            return view

    @property
    def arenas(self) -> int:
        """Arenas mapped now."""
        with self._lock:
            return len(self._arenas)

    def _read_messages(self, wait_s: float) -> bool:
        """Handle the server's messages waiting on the socket, waiting up to ``wait_s`` for the
        first (lock held); False if none came. A closed socket, an error or a message that breaks
        the protocol ends the plane."""
        got = False
        while self._alive:
            try:
                readable, _, _ = select.select([self._sock], [], [], 0.0 if got else wait_s)
                if not readable:
                    return got
                message, fds, _, _ = socket.recv_fds(self._sock, proto.MAX_MESSAGE, 1)
            except (OSError, ValueError):
                message, fds = b"", []
            got = True
            try:
                if not message:
                    raise proto.ProtocolError("closed")
                self._on_message(proto.decode(message), fds)
            except proto.ProtocolError as exc:
                log.warning("shared-memory plane %s ended: %s", self.id[:8], exc)
                self._alive = False
                self._sock.close()
                self._arenas.clear()  # their mappings go with the last batch still holding a view
            finally:
                for fd in fds:
                    os.close(fd)
        return got

    def _on_message(self, message: dict, fds: list[int]) -> None:
        op = message["op"]
        if op == proto.ARENA:
            number = proto.int_field(message, "arena", 1, proto.MAX_ID)
            size = proto.int_field(message, "size", proto.PAGE, proto.MAX_ID)
            if len(fds) != 1:
                raise proto.ProtocolError("arena: needs the arena's descriptor attached")
            info = os.fstat(fds[0])
            if not stat.S_ISREG(info.st_mode) or info.st_size < size:
                raise proto.ProtocolError(f"arena: {info.st_size} bytes, not the {size} announced")
            try:
                self._arenas[number] = memoryview(mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ))
            except (OSError, ValueError) as exc:
                raise proto.ProtocolError(f"arena: cannot be mapped: {exc}") from None
        elif op == proto.FORGET:  # unmapped once the last view of it (a held batch) is gone
            self._arenas.pop(proto.int_field(message, "arena", 1, proto.MAX_ID), None)
        else:  # ERROR, or anything else: the server ends the plane
            raise proto.ProtocolError(str(message.get("message", f"unexpected {op!r}")))

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
        """End the plane: the server frees every slot and lease; the buffer and the arenas' mappings
        go with their last views."""
        with self._lock:
            if self._alive:
                self._alive = False
                self._sock.close()
            self._arenas.clear()


class PlaneStreamState:
    """The slots one Fetch stream received and still holds; thread-safe."""

    def __init__(self, plane: ShmPlane, stream_id: int) -> None:
        self.plane = plane
        self.id = stream_id
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._leases: set[int] = set()
        self._finished = False
        self.bytes_received = 0
        self.bytes_copied = 0  # of those, copied out of a slot because the buffer was more than half held
        self.bytes_in_place = 0  # of those, DRAM hits read in the server's arena

    def receive(self, batch: FetchBatch) -> list[FetchBatch]:
        """The batch's checked records in shared memory, as batches whose ``data`` points there and
        whose ``lease`` gives it back: the batch itself for a slot, one per run of adjacent records
        for DRAM hits in an arena (the last carries ``done``).

        ``PlaneError`` when the descriptor is out of range, names a slot or lease this stream
        already holds or an arena the server did not send, or a record's CRC-32 does not match
        (the slot or lease is given back then, with the stream's end)."""
        ref = batch.shm
        assert ref is not None
        if ref.arena:
            return self._receive_in_place(batch)
        return [self._receive_slot(batch)]

    def _receive_in_place(self, batch: FetchBatch) -> list[FetchBatch]:
        ref = batch.shm
        assert ref is not None
        count = len(batch.indices)
        if count == 0 or ref.length % count or len(ref.crcs) != 4 * count or len(ref.offsets) != count:
            raise PlaneError(f"descriptor of {count} records, {ref.length} bytes, {len(ref.offsets)} offsets "
                             f"and {len(ref.crcs)} checksum bytes does not describe whole records")
        with self._lock:
            if ref.lease in self._leases:
                raise PlaneError(f"descriptor names lease {ref.lease}, which this stream still holds")
            self._leases.add(ref.lease)
        try:
            arena = self.plane.arena(ref.arena)
            size = ref.length // count
            expected = struct.unpack(f"<{count}I", ref.crcs)
            runs, first = [], 0
            for k in range(1, count + 1):
                if k == count or ref.offsets[k] != ref.offsets[k - 1] + size:
                    start, stop = ref.offsets[first], ref.offsets[k - 1] + size
                    if stop > len(arena):
                        raise PlaneError(f"descriptor offset {ref.offsets[k - 1]} is outside arena {ref.arena} "
                                         f"of {len(arena)} bytes")
                    data = arena[start:stop]
                    bad = first_bad_record(data, size, expected[first:k])
                    if bad is not None:
                        raise PlaneError(f"checksum mismatch in shared memory: region {batch.region!r}, "
                                         f"record {batch.indices[first + bad]} (arena {ref.arena})")
                    runs.append((first, k, data))
                    first = k
        except PlaneError:
            with self._lock:  # not given back: the stream fails, and its end frees the lease
                self._leases.discard(ref.lease)
            raise
        self.bytes_received += ref.length
        self.bytes_in_place += ref.length
        shared = _SharedLease(self, ref.lease, len(runs))
        return [FetchBatch(batch.tag, batch.region, batch.indices[a:b], data, batch.done and b == count,
                           False, 0, "", ref, _PartLease(shared)) for a, b, data in runs]

    def _give_back_lease(self, lease: int) -> None:
        with self._lock:
            if lease not in self._leases:
                return
            self._leases.discard(lease)
        self.plane.send(proto.UNPIN, stream=self.id, leases=[lease])

    def _receive_slot(self, batch: FetchBatch) -> FetchBatch:
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
            holding, leases = sorted(self._held), sorted(self._leases)
        self.plane.send(proto.END, stream=self.id, holding=holding, leases=leases)

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


class _SharedLease:
    """A lease on DRAM hits split over ``parts`` batches: given back when every part is released."""

    __slots__ = ("_state", "_lease", "_left", "_lock")

    def __init__(self, state: PlaneStreamState, lease: int, parts: int) -> None:
        self._state, self._lease, self._left = state, lease, parts
        self._lock = threading.Lock()

    def part_done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._state._give_back_lease(self._lease)


class _PartLease:
    """One part's hold on a :class:`_SharedLease`; :meth:`release` is idempotent, any thread."""

    __slots__ = ("_shared", "_released")

    def __init__(self, shared: _SharedLease) -> None:
        self._shared, self._released = shared, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._shared.part_done()
