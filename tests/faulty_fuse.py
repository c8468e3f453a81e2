"""A one-file FUSE filesystem whose reads of a chosen byte range fail with EIO (a real kernel error).

Test support for ``test_faults.py``: the kernel's FUSE driver is spoken directly on ``/dev/fuse``
(no libfuse), enough for one read-only file ``/data``: INIT, LOOKUP, GETATTR, OPEN, READ, FLUSH,
RELEASE; anything else answers ENOSYS. Reads that overlap ``bad`` get ``-EIO``, so a process
reading the file through the kernel sees ``OSError(EIO)`` exactly as from a failing disk.
Needs root and ``/dev/fuse``; :func:`unavailable` says why not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from pathlib import Path
from types import TracebackType

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, BATCH_FORGET = 1, 2, 3, 14, 15, 18, 25, 26, 42
ROOT, FILE = 1, 2
NAME = "data"


def unavailable() -> str | None:
    """Why a FUSE filesystem cannot be mounted here, or None when it can."""
    if os.geteuid() != 0:
        return "mounting FUSE needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (the kernel has no FUSE)"
    return None


class FaultyFile:
    """Mount at ``mountpoint`` a file ``data`` holding ``content``; reads touching ``bad`` fail (EIO)."""

    def __init__(self, mountpoint: Path, content: bytes, bad: range) -> None:
        self.mountpoint, self.content, self.bad = mountpoint, content, bad
        self.path = mountpoint / NAME
        self.failed_reads = 0
        self._fd = -1
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FaultyFile":
        self._fd = os.open("/dev/fuse", os.O_RDWR)
        libc = ctypes.CDLL(None, use_errno=True)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"ckv-faulty", str(self.mountpoint).encode(), b"fuse", 0, options) != 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, f"mount fuse on {self.mountpoint}: {os.strerror(code)}")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH
        self._thread.join(10)
        os.close(self._fd)

    # -- the protocol ----------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._fd, 1 << 20)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return  # ENODEV: unmounted
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
            body = request[IN_HEADER.size:]
            if opcode in (FORGET, BATCH_FORGET):
                continue  # no reply
            error, reply = self._answer(opcode, nodeid, body)
            self._reply(unique, error, reply)

    def _answer(self, opcode: int, nodeid: int, body: bytes) -> tuple[int, bytes]:
        if opcode == INIT:
            major, minor, readahead, _ = struct.unpack_from("<IIII", body)
            # fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
            # max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused[6]
            return 0, struct.pack("<IIIIHHIIHHII24x", 7, min(minor, 31), readahead, 0, 16, 12, 4096, 1, 32, 0, 0, 0)
        if opcode == LOOKUP:
            if nodeid == ROOT and body.split(b"\0", 1)[0].decode() == NAME:
                return 0, struct.pack("<QQQQII", FILE, 0, 60, 60, 0, 0) + self._attr(FILE)
            return -errno.ENOENT, b""
        if opcode == GETATTR:
            return 0, struct.pack("<QII", 60, 0, 0) + self._attr(nodeid)
        if opcode == OPEN:
            return (0, struct.pack("<QIi", 1, 0, 0)) if nodeid == FILE else (-errno.EISDIR, b"")
        if opcode == READ:
            _, offset, size = struct.unpack_from("<QQI", body)
            end = min(offset + size, len(self.content))
            if offset < self.bad.stop and end > self.bad.start:
                self.failed_reads += 1
                return -errno.EIO, b""
            return 0, self.content[offset:end]
        if opcode in (FLUSH, RELEASE):
            return 0, b""
        return -errno.ENOSYS, b""

    def _attr(self, nodeid: int) -> bytes:
        if nodeid == FILE:
            mode, size, links = stat.S_IFREG | 0o444, len(self.content), 1
        else:
            mode, size, links = stat.S_IFDIR | 0o555, 0, 2
        # ino, size, blocks, atime, mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags
        return ATTR.pack(nodeid, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, links, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, error: int, body: bytes) -> None:
        payload = b"" if error else body
        os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)
