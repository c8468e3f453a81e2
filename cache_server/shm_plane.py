"""The cache server's side of the shared-memory data plane (protocol: :mod:`contiguouskv.common.shm_protocol`).

:class:`PlaneServer` listens on the configured Unix socket (mode 0600, in a directory it creates
with mode 0700) and accepts only peers running as the server's own uid. Each accepted ``hello``
makes a :class:`Plane`: the client's buffer mapped, its slots free. A Fetch stream opened with the
plane's id gets a :class:`PlaneStream`, through which its :class:`~.fetch.FetchSession` takes a
free slot for each batch, writes the batch there, and hands it to the client by sending the
descriptor. Every slot is in one of three states:

- free;
- *writing*: taken by a session, being filled (the client does not know it);
- *sent*: its descriptor went out on stream S; the client may read it until it releases it.

A writing slot goes back to free when its session drops the batch (cancelled, failed, or the
stream already ended), only after the thread writing it has finished. A sent slot goes back when
the client releases it, or with ``end`` of its stream unless the client says it still holds it. A
slot is never written while sent, and never handed out while written. When the client's socket
closes, the plane is forgotten; its mapping is freed when the last batch still being written lets
go of it (views keep the ``mmap`` alive, so nothing is unmapped under a running write).

A batch wholly in the DRAM cache takes no slot: its records are read in place from the object's
arena (:mod:`.dram_arena`), which the plane sends the client (read-only) the first time. Such a
batch holds a *lease*: the DRAM cache's pin on its records (:class:`~.dram_cache.Pin`), lent
(unsent) or sent on stream S, given back by ``unpin``, by ``end`` unless listed in its ``leases``,
or when the plane closes. An arena freed by the DRAM cache (its object deleted, no record pinned)
is ``forget``-ed on every plane that had it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import secrets
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

from contiguouskv.cache_server.dram_arena import Arena
from contiguouskv.cache_server.dram_cache import DramCache, Pin
from contiguouskv.cache_server.errors import InvalidArgument
from contiguouskv.cache_server.read_process import ReadProcesses
from contiguouskv.cache_server.stats import Counters
from contiguouskv.common import shm_protocol as proto

log = logging.getLogger(__name__)

WRITING = -1  # the owner of a slot being written by a session (stream ids are >= 0)


class Plane:
    """One client's shared buffer: ``slots`` slots of ``slot_bytes``; event-loop only."""

    def __init__(self, plane_id: str, buffer: mmap.mmap, slots: int, slot_bytes: int, counters: Counters) -> None:
        self.id = plane_id
        self.slots, self.slot_bytes = slots, slot_bytes
        self._view = memoryview(buffer)
        self._counters = counters
        self._free = list(range(slots - 1, -1, -1))
        self._owner: dict[int, int] = {}  # slot -> WRITING or the stream it was sent on
        self._open: dict[int, PlaneStream] = {}  # stream id -> its stream while the Fetch call runs
        self._ended: set[int] = set()  # streams the client said are over
        self._leases: dict[int, tuple[int, Pin]] = {}  # lease -> (WRITING or the stream it was sent on, pin)
        self._lease_ids = itertools.count(1)
        self._arenas: set[int] = set()  # arenas the client was sent
        self.conn: socket.socket | None = None  # the control socket (set by the server)
        self.closed = False

    # --- streams ---------------------------------------------------------------------------------
    def open_stream(self, stream_id: int) -> PlaneStream:
        """The server side of Fetch stream ``stream_id``; ``InvalidArgument`` if the id was used."""
        if stream_id in self._open or stream_id in self._ended or stream_id in self._owner.values():
            raise InvalidArgument(f"open.shm_stream: {stream_id} is already used on plane {self.id[:8]}")
        stream = PlaneStream(self, stream_id)
        self._open[stream_id] = stream
        return stream

    def _stream_closed(self, stream: PlaneStream) -> None:
        if self._open.get(stream.id) is stream:
            del self._open[stream.id]

    # --- slots -----------------------------------------------------------------------------------
    def take(self) -> int | None:
        """A free slot, now *writing*; ``None`` if none is free or the plane is closed."""
        if self.closed or not self._free:
            return None
        slot = self._free.pop()
        self._owner[slot] = WRITING
        self._counters.add(shm_slots_lent=1)
        return slot

    def view(self, slot: int, nbytes: int) -> memoryview:
        """The first ``nbytes`` of ``slot`` (page-aligned: O_DIRECT reads may target it)."""
        start = slot * self.slot_bytes
        return self._view[start : start + nbytes]

    def sent(self, slot: int, stream_id: int) -> bool:
        """Mark a written slot as handed to the client on ``stream_id``; False (slot freed) when the
        client already ended that stream or the plane closed: the batch must not be sent then."""
        if self.closed or stream_id in self._ended:
            self.drop(slot)
            return False
        self._owner[slot] = stream_id
        return True

    def drop(self, slot: int) -> None:
        """A slot taken by a session whose batch is not sent (and whose write has finished)."""
        if self._owner.get(slot) == WRITING:
            self._free_slot(slot)

    def release(self, stream_id: int, slots: list[int]) -> None:
        """The client gives back ``slots`` it got on ``stream_id``; ``ProtocolError`` for any other."""
        for slot in slots:
            if self._owner.get(slot) != stream_id:
                raise proto.ProtocolError(f"release: slot {slot} is not held on stream {stream_id}")
            self._free_slot(slot)

    def end(self, stream_id: int, holding: Sequence[int], leases: Sequence[int] = ()) -> None:
        """Stream ``stream_id`` is over for the client: its sent slots not in ``holding`` are free,
        its leases not in ``leases`` given back."""
        keep, kept = set(holding), set(leases)
        for slot in keep:
            if self._owner.get(slot) != stream_id:
                raise proto.ProtocolError(f"end: slot {slot} is not held on stream {stream_id}")
        for lease in kept:
            if lease not in self._leases or self._leases[lease][0] != stream_id:
                raise proto.ProtocolError(f"end: lease {lease} is not held on stream {stream_id}")
        self._ended.add(stream_id)
        for slot, owner in list(self._owner.items()):
            if owner == stream_id and slot not in keep:
                self._free_slot(slot)
        for lease, (owner, _) in list(self._leases.items()):
            if owner == stream_id and lease not in kept:
                self._give_back(lease)

    def close(self) -> None:
        """The client is gone: every slot it held is free (its batches being written are dropped),
        every lease given back."""
        if self.closed:
            return
        self.closed = True
        held = sum(1 for owner in self._owner.values() if owner != WRITING)
        for slot in [s for s, owner in self._owner.items() if owner != WRITING]:
            del self._owner[slot]
        self._counters.add(shm_slots_lent=-held)
        for lease in list(self._leases):
            self._give_back(lease)

    # --- arenas and leases -----------------------------------------------------------------------
    def share(self, arena: Arena) -> bool:
        """Make sure the client has ``arena`` (sent once, read-only); False if it cannot be sent now
        (the socket is full or broken: the batch then takes a slot)."""
        if arena.number in self._arenas:
            return True
        if self.closed or self.conn is None or arena.closed:
            return False
        fd = arena.reader_fd()
        try:
            socket.send_fds(self.conn, [proto.encode(proto.ARENA, arena=arena.number, size=arena.size)], [fd])
        except OSError:
            return False
        finally:
            os.close(fd)
        self._arenas.add(arena.number)
        return True

    def forget(self, number: int) -> None:
        """The DRAM cache freed arena ``number``: tell the client, if it has it, to unmap it."""
        if number in self._arenas and not self.closed and self.conn is not None:
            self._arenas.discard(number)
            try:
                self.conn.send(proto.encode(proto.FORGET, arena=number))
            except OSError:
                pass  # a full or broken socket: the client keeps an empty mapping until the plane ends

    def lend(self, pin: Pin) -> int:
        """A new lease holding ``pin`` for a batch about to be sent."""
        lease = next(self._lease_ids)
        self._leases[lease] = (WRITING, pin)
        self._counters.add(shm_leases=1)
        return lease

    def sent_lease(self, lease: int, stream_id: int) -> bool:
        """Mark a lease as the client's on ``stream_id``; False (given back) when the client already
        ended that stream or the plane closed."""
        if self.closed or stream_id in self._ended or lease not in self._leases:
            self._give_back(lease)
            return False
        self._leases[lease] = (stream_id, self._leases[lease][1])
        return True

    def drop_lease(self, lease: int) -> None:
        """A lease whose batch is not sent."""
        if lease in self._leases and self._leases[lease][0] == WRITING:
            self._give_back(lease)

    def unpin(self, stream_id: int, leases: list[int]) -> None:
        """The client gives back ``leases`` it got on ``stream_id``; ``ProtocolError`` for any other."""
        for lease in leases:
            if lease not in self._leases or self._leases[lease][0] != stream_id:
                raise proto.ProtocolError(f"unpin: lease {lease} is not held on stream {stream_id}")
            self._give_back(lease)

    def _give_back(self, lease: int) -> None:
        entry = self._leases.pop(lease, None)
        if entry is None:  # already back: the plane closed while its batch was on the way
            return
        entry[1].release()
        self._counters.add(shm_leases=-1)

    def _free_slot(self, slot: int) -> None:
        del self._owner[slot]
        self._counters.add(shm_slots_lent=-1)
        if not self.closed:
            self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)


class PlaneStream:
    """One Fetch stream's use of a plane: a slot for each batch while one is free (else the batch
    goes as bytes: a client may hold every slot until records still to come arrive)."""

    def __init__(self, plane: Plane, stream_id: int) -> None:
        self.plane = plane
        self.id = stream_id

    @property
    def slot_bytes(self) -> int:
        return self.plane.slot_bytes

    @property
    def usable(self) -> bool:
        """False once the client ended the stream or closed the plane: nothing more can be sent."""
        return not self.plane.closed and self.id not in self.plane._ended

    def take(self) -> int | None:
        return self.plane.take() if self.usable else None

    def view(self, slot: int, nbytes: int) -> memoryview:
        return self.plane.view(slot, nbytes)

    @property
    def key(self) -> str:
        """The plane's buffer as the read helpers know it (:meth:`.read_process.ReadProcesses.add_buffer`)."""
        return self.plane.id

    def offset(self, slot: int) -> int:
        """Where ``slot`` starts in the plane's buffer."""
        return slot * self.plane.slot_bytes

    def sent(self, slot: int) -> bool:
        return self.plane.sent(slot, self.id)

    def drop(self, slot: int) -> None:
        self.plane.drop(slot)

    def share(self, arena: Arena) -> bool:
        return self.usable and self.plane.share(arena)

    def lend(self, pin: Pin) -> int:
        return self.plane.lend(pin)

    def sent_lease(self, lease: int) -> bool:
        return self.plane.sent_lease(lease, self.id)

    def drop_lease(self, lease: int) -> None:
        self.plane.drop_lease(lease)

    def close(self) -> None:
        """The Fetch call ended; slots it sent stay the client's until released or ended."""
        self.plane._stream_closed(self)


class PlaneServer:
    """Accepts planes on ``path``; runs on the server's event loop (:meth:`start`, :meth:`close`)."""

    def __init__(self, path: str, counters: Counters, helpers: ReadProcesses | None = None,
                 cache: DramCache | None = None) -> None:
        self.path = Path(path)
        self._counters = counters
        self._helpers = helpers
        self._cache = cache
        self._planes: dict[str, Plane] = {}
        self._connections: dict[socket.socket, Plane | None] = {}
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and accept on the running loop."""
        self._loop = asyncio.get_running_loop()
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise OSError(f"shm_socket: {self.path} exists and is not a socket")
            if _listening(self.path):  # taking it over would hand that server's clients to this one
                raise OSError(f"shm_socket: {self.path} is in use by a running cache server; "
                              "give each server its own socket")
            self.path.unlink()  # stale: left by a server that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old = os.umask(0o177)  # the socket is created 0600: only the server's user may connect
            try:
                listener.bind(str(self.path))
            finally:
                os.umask(old)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)
        if self._cache is not None and self._cache.shared:
            loop = self._loop

            def closed(number: int) -> None:  # any thread, under the cache's lock
                try:
                    loop.call_soon_threadsafe(self._forget_arena, number)
                except RuntimeError:  # the loop is closed: no plane is left to tell
                    pass
            self._cache.on_arena_closed = closed
        log.info("shared-memory data plane on %s%s", self.path,
                 "; DRAM hits in place" if self._cache is not None and self._cache.shared else "")

    def _forget_arena(self, number: int) -> None:
        for plane in self._planes.values():
            plane.forget(number)

    def find(self, plane_id: str) -> Plane | None:
        """The open plane with this id (``None``: unknown, so the stream uses gRPC bytes)."""
        plane = self._planes.get(plane_id)
        return plane if plane is not None and not plane.closed else None

    @property
    def planes(self) -> int:
        return len(self._planes)

    def close(self) -> None:
        """Stop accepting, end every plane, remove the socket file."""
        assert self._loop is not None
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        for conn in list(self._connections):
            self._drop(conn)

    # --- event loop ------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        uid = proto.peer_uid(conn)
        if uid != os.getuid():
            log.warning("shared-memory plane refused: peer uid %d is not the server's uid %d", uid, os.getuid())
            self._refuse(conn, f"peer uid {uid} is not the cache server's uid {os.getuid()}")
            return
        conn.setblocking(False)
        self._connections[conn] = None
        self._loop.add_reader(conn.fileno(), self._on_message, conn)

    @staticmethod
    def _refuse(conn: socket.socket, message: str) -> None:
        try:
            conn.send(proto.encode(proto.ERROR, message=message))
        except OSError:
            pass
        conn.close()

    def _on_message(self, conn: socket.socket) -> None:
        while conn in self._connections:
            try:
                message, fds, _, _ = socket.recv_fds(conn, proto.MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if not message:
                for fd in fds:
                    os.close(fd)
                self._drop(conn)
                return
            try:
                self._handle(conn, proto.decode(message), fds)
            except proto.ProtocolError as exc:
                log.warning("shared-memory plane ended: %s", exc)
                try:
                    conn.send(proto.encode(proto.ERROR, message=str(exc)))
                except OSError:
                    pass
                self._drop(conn)
                return
            finally:
                for fd in fds:
                    os.close(fd)

    def _handle(self, conn: socket.socket, message: dict, fds: list[int]) -> None:
        op, plane = message["op"], self._connections[conn]
        if op == proto.HELLO:
            if plane is not None:
                raise proto.ProtocolError("hello: this connection already has a plane")
            if len(fds) != 1:
                raise proto.ProtocolError("hello: needs the shared buffer's descriptor attached")
            plane = self._map(message, fds[0])
            plane.conn = conn
            self._connections[conn] = plane
            conn.send(proto.encode(proto.WELCOME, plane=plane.id))
            return
        if plane is None:
            raise proto.ProtocolError(f"{op}: no plane yet (hello first)")
        if fds:
            raise proto.ProtocolError(f"{op}: unexpected descriptor")
        stream = proto.int_field(message, "stream")
        if op == proto.RELEASE:
            plane.release(stream, proto.int_list(message, "slots", plane.slots))
        elif op == proto.UNPIN:
            plane.unpin(stream, proto.int_list(message, "leases", proto.MAX_ID))
        elif op == proto.END:
            leases = proto.int_list(message, "leases", proto.MAX_ID) if "leases" in message else []
            plane.end(stream, proto.int_list(message, "holding", plane.slots), leases)
        else:
            raise proto.ProtocolError(f"unknown op {op!r}")

    def _map(self, message: dict, fd: int) -> Plane:
        slots = proto.int_field(message, "slots", 2, 1 << 20)
        slot_bytes = proto.int_field(message, "slot_bytes", proto.PAGE, proto.MAX_PLANE_BYTES)
        proto.check_geometry(slots, slot_bytes)
        size = slots * slot_bytes
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < size:
            raise proto.ProtocolError(f"hello: the buffer holds {info.st_size} bytes, not the {size} announced")
        try:
            buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise proto.ProtocolError(f"hello: the buffer cannot be mapped: {exc}") from None
        plane = Plane(secrets.token_hex(16), buffer, slots, slot_bytes, self._counters)
        if self._helpers is not None:  # disk reads go straight into the client's buffer
            self._helpers.add_buffer(plane.id, fd, size)
        self._planes[plane.id] = plane
        self._counters.add(shm_planes=1)
        log.info("shared-memory plane %s: %d slots of %d bytes", plane.id[:8], slots, slot_bytes)
        return plane

    def _drop(self, conn: socket.socket) -> None:
        assert self._loop is not None
        plane = self._connections.pop(conn, None)
        try:
            self._loop.remove_reader(conn.fileno())
        except (ValueError, OSError):
            pass
        conn.close()
        if plane is not None:
            plane.close()
            del self._planes[plane.id]
            if self._helpers is not None:
                self._helpers.remove_buffer(plane.id)
            self._counters.add(shm_planes=-1)
            log.info("shared-memory plane %s closed", plane.id[:8])


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` (else it is stale)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: stale
            return False
        except OSError:  # EACCES and the like: another user's socket, not ours to take
            return True
        return True
