"""Disk reads in helper processes, so that reading does not compete with sending for the GIL.

The server's event loop sends Fetch responses through grpc.aio, which writes each message to the
socket while holding the GIL. Read threads in the same process need the GIL after every ``preadv``
and for every checksum, so reading and sending slowed each other down: on two cores, gRPC from disk
reached 0.65-0.8 GB/s while the disk alone read 0.85-0.9 and a bare gRPC stream alone sent 1.3-1.5;
side by side in *separate* processes the two kept 0.83-1.03 and 1.16-1.47 GB/s (docs/storage.md).
So the reads run in helpers:

- :class:`ReadProcesses` (in the server) owns a shared buffer (a ``memfd``) cut into slots and
  ``processes`` helper processes (``python -m contiguouskv.cache_server.read_process``). A helper
  submits the reads of O_DIRECT files from one thread through Linux native AIO
  (:mod:`.native_aio`, ``4 * threads`` in flight; engine ``aio``, the default), which costs about
  half the CPU of one blocking ``preadv`` per thread; buffered files, engine ``threads``, or a
  kernel that refuses AIO get ``threads`` threads. Each helper is one ``SOCK_SEQPACKET`` socket away.
- The event loop sends a batch's coalesced runs to a helper as one message, with the data file's
  descriptor attached (``SCM_RIGHTS``: the same open file, so a deleted object still reads). The
  helper reads the runs in parallel with O_DIRECT straight into the batch's slot, checks every
  record's CRC-32, and answers with one small message, read by the event loop
  (``loop.add_reader``): no thread of the server takes part.
- The server then builds the response from the slot with one copy, as it does from its own buffers.

A helper never sends bytes of records, only a report; a checksum mismatch or an I/O error comes back
as a report the server turns into DATA_LOSS or INTERNAL for that request. A slot stays lent until
its helper answered, even when the request was cancelled. A helper exits when its socket closes
(the server stopped or died); if a helper dies, its pending reads fail with INTERNAL and new reads
go to the other helpers, or to the server's own read threads when none is left. This module is
what the helpers run: it imports nothing beyond the standard library, :mod:`.native_aio` and the
checksum.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import dataclasses
import fcntl
import logging
import mmap
import os
import pickle
import selectors
import struct
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from queue import SimpleQueue

from contiguouskv.cache_server.native_aio import NativeAio, open_native_aio
from contiguouskv.common.checksum import crc32_any_size, first_bad_record

log = logging.getLogger(__name__)

# (file offset, bytes, offset in the shared buffer, first record's index, the records' packed CRC-32s)
Run = tuple[int, int, int, int, bytes]
MAX_MESSAGE = 1 << 20  # a request (runs and checksums of one batch) is far smaller
OWN = ""  # the key of the server's own slot buffer; a data plane's buffer goes by its plane id
MAP, UNMAP = "map", "unmap"  # in place of a request's runs: map (with the memfd) or forget a buffer


@dataclasses.dataclass(frozen=True, slots=True)
class ReadReport:
    """What a helper did for one request: per-run seconds, and the first failure if any."""

    seconds: tuple[float, ...]
    failure: tuple[str, str] | None = None  # (kind: "data_loss" | "short" | "io", message)
    bad_record: int | None = None  # index of a record whose checksum did not match
    note: str = ""  # a hello's answer: how the helper reads (native AIO or threads)


# -- in the helper process ---------------------------------------------------------------------

AIO, THREADS = "aio", "threads"  # how a helper reads O_DIRECT files (buffered ones: always threads)
ENGINES = (AIO, THREADS)


@dataclasses.dataclass(eq=False)
class _Target:
    """A buffer the helper reads into: the server's slots or a data plane's buffer."""

    view: memoryview
    address: int  # where ``view`` starts in this process (for native AIO)
    anchor: object  # keeps ``address`` valid while a read may still land there


def _target(mapping: mmap.mmap) -> _Target:
    anchor = ctypes.c_char.from_buffer(mapping)
    return _Target(memoryview(mapping), ctypes.addressof(anchor), anchor)


def _serve(sock: socket.socket, buffer: mmap.mmap, threads: int, engine: str) -> None:
    """Answer requests on ``sock`` until it closes.

    Runs of O_DIRECT files go to one native AIO context (:mod:`.native_aio`, ``4 * threads`` reads
    in flight) when ``engine`` is ``aio`` and the kernel allows; the others to a queue that
    ``threads`` threads take in order. Either way the runs of earlier requests start first, so
    batches complete in about the order they were asked for (the server sends them in that order).
    """
    send_lock = threading.Lock()
    buffers = {OWN: _target(buffer)}  # the server's slots, and the data planes' buffers by key
    queue: SimpleQueue[tuple[_HelperRead, int] | None] = SimpleQueue()
    aio, described = open_native_aio(4 * threads) if engine == AIO else (None, "threads")

    def answer(request_id: int, report: ReadReport) -> None:
        # plain tuples only: in the helper this module is __main__, so its classes do not pickle
        with send_lock:
            sock.send(pickle.dumps((request_id, report.seconds, report.failure, report.bad_record, report.note)))

    def finish(request: _HelperRead, k: int, report: ReadReport) -> None:
        with request.lock:
            request.reports[k] = report
            request.left -= 1
            if request.left:
                return
        os.close(request.fd)
        answer(request.request_id, _merge(request.reports))

    def work() -> None:
        while (item := queue.get()) is not None:
            request, k = item
            try:
                report = _read_run(request.fd, request.target.view, request.runs[k], request.stride, request.size)
            except Exception as exc:  # noqa: BLE001 - every request gets an answer
                report = ReadReport((), ("io", f"read helper failed: {exc!r}"))
            finish(request, k, report)

    workers = [threading.Thread(target=work, name=f"ckv-helper-read-{n}", daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    reads = _AioRuns(aio, finish) if aio is not None else None
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    if aio is not None:
        selector.register(aio.fd, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is not sock:
                    assert reads is not None
                    reads.completed()
                    continue
                message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
                if not message:
                    return
                request_id, runs, stride, size, key_ = pickle.loads(message)
                if runs == MAP:  # a client's shared buffer (a data plane, cache_server/shm_plane.py)
                    buffers[key_] = _target(mmap.mmap(fds[0], size))
                    os.close(fds[0])
                    answer(request_id, ReadReport(()))
                    continue
                if runs == UNMAP:  # reads still running keep their target; the mapping goes with the last
                    buffers.pop(key_, None)
                    answer(request_id, ReadReport(()))
                    continue
                target = buffers.get(key_)
                if not runs or target is None:  # a hello (the server waits for one), or nowhere to read
                    os.close(fds[0])
                    answer(request_id, ReadReport((), None if target is not None else ("io", f"no buffer {key_!r}"),
                                                  note=described))
                    continue
                request = _HelperRead(request_id, fds[0], runs, stride, size, [None] * len(runs), len(runs), target)
                if reads is not None and fcntl.fcntl(request.fd, fcntl.F_GETFL) & os.O_DIRECT:
                    reads.add(request)
                    continue
                for k in range(len(runs)):
                    queue.put((request, k))
    finally:
        for _ in workers:
            queue.put(None)
        if aio is not None:
            aio.close()  # waits for reads in flight: nothing lands in a buffer after the helper exits


@dataclasses.dataclass(eq=False)
class _HelperRead:
    request_id: int
    fd: int
    runs: Sequence[Run]
    stride: int
    size: int
    reports: list[ReadReport | None]
    left: int
    target: _Target
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class _AioRuns:
    """The runs of O_DIRECT requests through one native AIO context, in the order they came.

    A run's read may come back short (the kernel splits large reads); the rest is read next, then
    the run is checked as a thread would check it (:func:`_check_run`).
    """

    def __init__(self, aio: NativeAio, finish: Callable[[_HelperRead, int, ReadReport], None]) -> None:
        self._aio = aio
        self._finish = finish
        self._waiting: collections.deque[tuple[_HelperRead, int, int, float]] = collections.deque()

    def add(self, request: _HelperRead) -> None:
        now = time.perf_counter()
        self._waiting.extend((request, k, 0, now) for k in range(len(request.runs)))
        self._submit()

    def completed(self) -> None:
        for (request, k, done, started), result in self._aio.reap():
            offset, nbytes, at, first, crcs = request.runs[k]
            if result < 0:
                self._finish(request, k, _io_failure(offset + done, -result))
            elif result == 0:
                self._finish(request, k, _short(offset + done, nbytes, offset))
            elif done + result < nbytes:
                self._waiting.appendleft((request, k, done + result, started))
            else:
                part = request.target.view[at : at + nbytes]
                self._finish(request, k, _check_run(part, first, crcs, request.stride, request.size,
                                                    time.perf_counter() - started))
        self._submit()

    def _submit(self) -> None:
        while self._waiting and self._aio.room:
            batch = [self._waiting[k] for k in range(min(self._aio.room, len(self._waiting)))]
            reads = []
            for request, k, done, started in batch:
                offset, nbytes, at, _, _ = request.runs[k]
                reads.append((request.fd, request.target.address + at + done, nbytes - done, offset + done,
                              (request, k, done, started)))
            taken, refused = self._aio.submit(reads)
            for _ in range(taken):
                self._waiting.popleft()
            for (request, k, done, _), error in refused:
                self._finish(request, k, _io_failure(request.runs[k][0] + done, -error))
            if taken < len(reads):
                return  # the kernel is full: the rest goes after the next completions


def _merge(reports: Sequence[ReadReport | None]) -> ReadReport:
    seconds = tuple(s for r in reports if r is not None for s in r.seconds)
    failed = next((r for r in reports if r is not None and r.failure is not None), None)
    return ReadReport(seconds, failed.failure, failed.bad_record) if failed else ReadReport(seconds)


def _io_failure(at: int, error: int) -> ReadReport:
    return ReadReport((), ("io", f"at {at} failed: [Errno {error}] {os.strerror(error)}"))


def _short(at: int, nbytes: int, offset: int) -> ReadReport:
    return ReadReport((), ("short", f"ends at {at}, before the {nbytes} bytes at {offset}"))


def _read_run(fd: int, buffer: memoryview, run: Run, stride: int, size: int) -> ReadReport:
    """Read one run into ``buffer`` and check each of its records against the run's CRC-32s."""
    offset, nbytes, at, first, crcs = run
    part = buffer[at : at + nbytes]
    started = time.perf_counter()
    done = 0
    while done < nbytes:
        try:
            got = os.preadv(fd, [part[done:]], offset + done)
        except OSError as exc:
            return _io_failure(offset + done, exc.errno)
        if got == 0:
            return _short(offset + done, nbytes, offset)
        done += got
    return _check_run(part, first, crcs, stride, size, time.perf_counter() - started)


def _check_run(part: memoryview, first: int, crcs: bytes, stride: int, size: int, seconds: float) -> ReadReport:
    """The report of a run read into ``part``: its records checked against their CRC-32s."""
    expected = struct.unpack(f"<{len(crcs) // 4}I", crcs)
    if stride == size:  # back to back: one CRC-32 of the run against the records' CRCs combined
        bad = first_bad_record(part, size, expected)
        if bad is None:
            return ReadReport((seconds,))
        return ReadReport((seconds,), ("data_loss", "checksum mismatch"), first + bad)
    for k, crc in enumerate(expected):
        # whole records: a helper shares no GIL with an event loop (contiguouskv/common/checksum.py)
        if crc32_any_size(part[k * stride : k * stride + size]) != crc:
            return ReadReport((seconds,), ("data_loss", "checksum mismatch"), first + k)
    return ReadReport((seconds,))


def main(argv: Sequence[str] | None = None) -> int:
    """A helper: ``--socket FD --buffer FD --buffer-bytes N --threads N --engine E`` (started by the server)."""
    parser = argparse.ArgumentParser(prog="python -m contiguouskv.cache_server.read_process")
    parser.add_argument("--socket", type=int, required=True)
    parser.add_argument("--buffer", type=int, required=True)
    parser.add_argument("--buffer-bytes", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--engine", choices=ENGINES, default=AIO)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket)
    buffer = mmap.mmap(args.buffer, args.buffer_bytes)
    os.close(args.buffer)
    _serve(sock, buffer, args.threads, args.engine)
    return 0


# -- in the server ---------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Helper:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    pending: dict[int, tuple[asyncio.Future[ReadReport], int | None]]  # request id -> (future, slot)
    alive: bool = True


class ReadProcesses:
    """Helper processes reading into slots of a shared buffer; see the module docstring.

    ``slots`` slots of ``slot_bytes`` each. :meth:`acquire` hands out a slot (``None`` when none is
    free or no helper is alive: the caller reads in its own threads then), :meth:`read` has a helper
    read one batch's runs into it, :meth:`release` gives it back. Start with :meth:`start` inside
    the event loop that will use it; stop with :meth:`close`.
    """

    def __init__(self, processes: int, threads: int, slots: int, slot_bytes: int, engine: str = AIO) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
        self.slot_bytes = slot_bytes
        self._processes, self._threads, self._engine = processes, threads, engine
        self.engines: list[str] = []  # how each helper reads, from its first answer (:meth:`ready`)
        self._size = slots * slot_bytes
        self._fd = os.memfd_create("ckv-read-buffers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, self._size)
            self._map = mmap.mmap(self._fd, self._size)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        self._free = list(range(slots - 1, -1, -1))
        self._lent: set[int] = set()  # slots whose request a helper has not answered yet
        self._abandoned: set[int] = set()  # lent slots already given back by their reader
        self._helpers: list[_Helper] = []
        self._ids = iter(range(1, 1 << 62))
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the helpers, reading their answers on the running event loop."""
        self._loop = asyncio.get_running_loop()
        for _ in range(self._processes):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "contiguouskv.cache_server.read_process",
                     "--socket", str(theirs.fileno()), "--buffer", str(self._fd),
                     "--buffer-bytes", str(self._size), "--threads", str(self._threads),
                     "--engine", self._engine],
                    pass_fds=(theirs.fileno(), self._fd), stdin=subprocess.DEVNULL)
            finally:
                theirs.close()
            ours.setblocking(False)
            helper = _Helper(process, ours, {})
            self._helpers.append(helper)
            self._loop.add_reader(ours.fileno(), self._on_answers, helper)

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until every helper has answered once (``OSError`` if one exited first)."""
        futures = [self._send(helper, [], 0, 0, self._fd, None) for helper in self._helpers]
        answers = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        self.engines = [answer.note for answer in answers]
        log.info("disk reads in %d helper processes of %d threads (pids %s); O_DIRECT reads by %s",
                 self._processes, self._threads, ", ".join(str(h.process.pid) for h in self._helpers),
                 "; ".join(sorted(set(self.engines))))

    @property
    def pids(self) -> list[int]:
        """Process ids of the helpers started."""
        return [h.process.pid for h in self._helpers]

    @property
    def free_slots(self) -> int:
        """Slots neither lent to a reader nor still being written by a helper."""
        return len(self._free)

    @property
    def helpers_alive(self) -> int:
        return sum(h.alive for h in self._helpers)

    def acquire(self, nbytes: int) -> int | None:
        """A free slot for a read of ``nbytes`` (``None`` if too big, none free, or no helper alive)."""
        if nbytes > self.slot_bytes or not self._free or not self.helpers_alive:
            return None
        return self._free.pop()

    def view(self, slot: int, nbytes: int) -> memoryview:
        """The first ``nbytes`` of ``slot``."""
        start = slot * self.slot_bytes
        return self._view[start : start + nbytes]

    def release(self, slot: int) -> None:
        """Give ``slot`` back; if a helper still owes an answer for it, it comes back with the answer."""
        if slot in self._lent:
            self._abandoned.add(slot)
        else:
            self._free.append(slot)

    async def read(self, data_fd: int, slot: int, runs: Sequence[Run], stride: int, size: int) -> ReadReport:
        """Have a helper read ``runs`` (offsets within ``slot``) of ``data_fd`` and check their CRC-32s.

        ``OSError`` if no helper could take it (the caller reads in its own threads then).
        """
        alive = [h for h in self._helpers if h.alive]
        if not alive:
            raise OSError("no read helper is running")
        helper = min(alive, key=lambda h: len(h.pending))
        base = slot * self.slot_bytes
        absolute = [(offset, nbytes, base + at, first, crcs) for offset, nbytes, at, first, crcs in runs]
        future = self._send(helper, absolute, stride, size, data_fd, slot)
        return await asyncio.shield(future)  # cancelled: the slot stays lent until the answer

    def add_buffer(self, key: str, fd: int, size: int) -> None:
        """Map a data plane's shared buffer (``fd``, ``size`` bytes) in every helper, as ``key``."""
        for helper in self._helpers:
            if helper.alive:
                self._send(helper, MAP, 0, size, fd, None, key)

    def remove_buffer(self, key: str) -> None:
        """Forget the buffer ``key`` in every helper (reads into it that still run finish first)."""
        for helper in self._helpers:
            if helper.alive:
                self._send(helper, UNMAP, 0, 0, None, None, key)

    def read_into(self, key: str, base: int, data_fd: int, runs: Sequence[Run], stride: int,
                  size: int) -> asyncio.Future[ReadReport]:
        """Have a helper read ``runs`` (offsets from ``base``) of ``data_fd`` into buffer ``key``.

        The future completes when the helper answered, i.e. when nothing writes the target any more
        (cancelling it does not stop the read). ``OSError`` if no helper could take it."""
        alive = [h for h in self._helpers if h.alive]
        if not alive:
            raise OSError("no read helper is running")
        helper = min(alive, key=lambda h: len(h.pending))
        absolute = [(offset, nbytes, base + at, first, crcs) for offset, nbytes, at, first, crcs in runs]
        return self._send(helper, absolute, stride, size, data_fd, None, key)

    def _send(self, helper: _Helper, runs: Sequence[Run] | str, stride: int, size: int,
              fd: int | None, slot: int | None, key: str = OWN) -> asyncio.Future[ReadReport]:
        request_id = next(self._ids)
        message = pickle.dumps((request_id, runs, stride, size, key))
        try:
            socket.send_fds(helper.sock, [message], [fd] if fd is not None else [])  # one message; the socket holds many
        except BlockingIOError:
            raise OSError(f"read helper {helper.process.pid} is not keeping up") from None
        future: asyncio.Future[ReadReport] = asyncio.get_running_loop().create_future()
        helper.pending[request_id] = (future, slot)
        if slot is not None:
            self._lent.add(slot)
        return future

    def _on_answers(self, helper: _Helper) -> None:
        while True:
            try:
                message = helper.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._lost(helper)
                return
            try:
                request_id, seconds, failure, bad_record, note = pickle.loads(message)
                future, slot = helper.pending.pop(request_id)
            except Exception:  # noqa: BLE001 - a helper that says nonsense is treated as gone
                log.exception("read helper %d sent an unreadable answer", helper.process.pid)
                helper.process.kill()
                helper.process.wait()  # gone before its slots are handed out again
                self._lost(helper)
                return
            report = ReadReport(seconds, failure, bad_record, note)
            if not future.done():
                future.set_result(report)
            self._returned(slot)

    def _lost(self, helper: _Helper) -> None:
        """``helper`` exited: fail what it owed (its process is gone, so the slots are free again)."""
        if not helper.alive:
            return
        helper.alive = False
        assert self._loop is not None
        self._loop.remove_reader(helper.sock.fileno())
        helper.sock.close()
        if helper.pending:
            log.error("read helper %d exited with %d reads pending", helper.process.pid, len(helper.pending))
        for future, slot in helper.pending.values():
            if slot in self._abandoned:
                future.cancel()  # its reader is gone: nobody would see the error
            elif not future.done():
                future.set_exception(OSError(f"read helper {helper.process.pid} exited"))
            self._returned(slot)
        helper.pending.clear()

    def _returned(self, slot: int | None) -> None:
        """The helper is done with ``slot``: free it now if its reader already gave it back."""
        if slot is None:
            return
        self._lent.discard(slot)
        if slot in self._abandoned:
            self._abandoned.discard(slot)
            self._free.append(slot)

    def close(self) -> None:
        """Stop the helpers and free the shared buffer. Call on the event loop, after the last read."""
        for helper in self._helpers:
            self._lost(helper)
        for helper in self._helpers:
            try:
                helper.process.wait(10)
            except subprocess.TimeoutExpired:
                helper.process.kill()
                helper.process.wait()
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a view of a slot is still alive: the mapping goes with it
            pass
        os.close(self._fd)


if __name__ == "__main__":
    raise SystemExit(main())
