"""Linux native AIO (``io_setup``, ``io_submit``, ``io_getevents``) for O_DIRECT reads into our buffers.

The read helpers (:mod:`.read_process`) used to read with a pool of threads, one blocking ``preadv``
each. Every completion then wakes a thread that must take the GIL, check its run and hand the GIL
on: on this project's 2-core VM the helper spent about 0.6 CPU-s per GB read, against about 0.3
for the same reads submitted from one thread through the kernel's AIO interface (docs/storage.md).
With O_DIRECT, kernel AIO is truly asynchronous: one thread keeps ``depth`` reads in flight, and
the kernel signals completions on an ``eventfd`` that the helper waits on beside its socket.

Why not a library: caio (the well-kept Python binding of the same interface) reads into buffers it
allocates itself, which are neither page-aligned (O_DIRECT refuses them) nor the shared slots the
records must land in. The interface here is three system calls with a stable ABI, called through
:mod:`ctypes` (which releases the GIL around them). On a buffered descriptor the kernel performs an
AIO read synchronously inside ``io_submit``, so callers use this only for O_DIRECT descriptors.

:func:`open_native_aio` returns ``None`` with the reason where the interface is missing: an
architecture whose system-call numbers are not listed here, or a seccomp policy that refuses them.
Standard library only: the helpers import nothing else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Sequence

# system-call numbers: (io_setup, io_destroy, io_submit, io_getevents)
_SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4), "arm64": (0, 1, 2, 4)}
IOCB_CMD_PREAD = 0
IOCB_FLAG_RESFD = 1  # signal aio_resfd (an eventfd) when the read completes

Read = tuple[int, int, int, int, object]  # (fd, buffer address, bytes, file offset, token)


class _Iocb(ctypes.Structure):  # struct iocb of linux/aio_abi.h, little-endian
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class NativeAio:
    """One kernel AIO context with room for ``depth`` reads in flight; single-threaded use.

    :meth:`submit` starts reads, :meth:`reap` collects the finished ones once :attr:`fd` (an
    eventfd) is readable. :meth:`close` waits for reads still in flight (the kernel cannot cancel
    O_DIRECT reads), so no buffer is written after it returns.
    """

    def __init__(self, depth: int) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(errno.ENOSYS, f"no AIO system-call numbers for {platform.machine()}")
        self._setup, self._destroy, self._submit, self._getevents = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self.depth = depth
        self._ctx = ctypes.c_ulong(0)
        if self._call(self._setup, ctypes.c_long(depth), ctypes.byref(self._ctx)) < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"io_setup: {os.strerror(error)}")
        try:
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            self._call(self._destroy, self._ctx)
            raise
        self._iocbs = (_Iocb * depth)()
        base = ctypes.addressof(self._iocbs)
        self._addresses = [base + k * ctypes.sizeof(_Iocb) for k in range(depth)]
        self._pointers = (ctypes.c_uint64 * depth)()  # the iocbs of one io_submit, in order
        self._events = (_Event * depth)()
        self._no_wait = _Timespec(0, 0)
        self._free = list(range(depth - 1, -1, -1))
        self._tokens: dict[int, object] = {}
        self._closed = False

    def _call(self, number: int, *args: object) -> int:
        return self._libc.syscall(ctypes.c_long(number), *args)

    @property
    def room(self) -> int:
        """Reads that can be submitted now."""
        return len(self._free)

    @property
    def busy(self) -> int:
        """Reads in flight."""
        return len(self._tokens)

    def submit(self, reads: Sequence[Read]) -> tuple[int, list[tuple[object, int]]]:
        """Start the first ``room`` of ``reads``; ``(how many were taken, [(token, -errno)])``.

        Reads not taken (the kernel is out of room) stay the caller's, to submit after a
        :meth:`reap`; a read the kernel refuses outright (a bad descriptor, a misaligned buffer) is
        taken and listed with its error. With nothing in flight at least one read is taken, so a
        caller that retries cannot spin.
        """
        count = min(len(reads), len(self._free))
        slots = [self._free.pop() for _ in range(count)]
        for k, (slot, (fd, address, nbytes, offset, token)) in enumerate(zip(slots, reads)):
            iocb = self._iocbs[slot]
            iocb.data, iocb.opcode, iocb.fildes = slot, IOCB_CMD_PREAD, fd
            iocb.buf, iocb.nbytes, iocb.offset = address, nbytes, offset
            iocb.flags, iocb.resfd = IOCB_FLAG_RESFD, self.fd
            self._pointers[k] = self._addresses[slot]
            self._tokens[slot] = token
        taken, failed = 0, []
        pointers = ctypes.addressof(self._pointers)
        while taken < count:
            started = self._call(self._submit, self._ctx, ctypes.c_long(count - taken),
                                 ctypes.c_void_p(pointers + 8 * taken))
            if started > 0:
                taken += started
                continue
            error = ctypes.get_errno() if started < 0 else errno.EAGAIN
            if error == errno.EINTR:
                continue
            if error == errno.EAGAIN and len(self._tokens) > count - taken:
                break  # out of room in the kernel for now: the rest waits for completions
            failed.append((self._tokens.pop(slots[taken]), -error))  # the kernel refused this one
            self._free.append(slots[taken])
            taken += 1
        for slot in slots[taken:]:  # not submitted: the caller keeps them
            del self._tokens[slot]
            self._free.append(slot)
        return taken, failed

    def reap(self) -> list[tuple[object, int]]:
        """The reads finished since the last call: ``(token, bytes read or -errno)``; never blocks."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        done: list[tuple[object, int]] = []
        while self._tokens:
            got = self._call(self._getevents, self._ctx, ctypes.c_long(0), ctypes.c_long(self.depth),
                             ctypes.byref(self._events), ctypes.byref(self._no_wait))
            if got < 0:
                error = ctypes.get_errno()
                if error == errno.EINTR:
                    continue
                raise OSError(error, f"io_getevents: {os.strerror(error)}")
            for event in self._events[:got]:
                slot = int(event.data)
                done.append((self._tokens.pop(slot), int(event.res)))
                self._free.append(slot)
            if got < self.depth:
                break
        return done

    def close(self) -> None:
        """Destroy the context (waiting for reads in flight) and close the eventfd."""
        if self._closed:
            return
        self._closed = True
        self._call(self._destroy, self._ctx)
        os.close(self.fd)


def open_native_aio(depth: int) -> tuple[NativeAio | None, str]:
    """A context, or ``None`` and why not (the caller reads with threads then)."""
    try:
        return NativeAio(depth), f"native AIO, {depth} reads in flight"
    except OSError as exc:
        return None, f"threads (native AIO unavailable: {exc.strerror or exc})"
