"""Shared test helpers: a real cache server in a subprocess, bound to 127.0.0.1 on port 0.

``start_cache_server(root, *extra_args)`` launches ``python -m contiguouskv.cache_server`` and
waits for its port file; the returned :class:`CacheProc` has ``.address``, ``.port``, ``.proc``
and ``.stop()`` (SIGTERM, wait, return the exit status), and is a context manager that stops it.
The ``cache_server`` fixture gives a fresh server on a temporary root for one test.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclasses.dataclass
class CacheProc:
    """A running cache server process started by :func:`start_cache_server`."""

    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log_path: Path

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send SIGTERM (if still running), wait for the exit, return its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"cache server ignored SIGTERM for {timeout}s:\n{self.log()}")

    def __enter__(self) -> CacheProc:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_cache_server(root: Path, *extra_args: str, timeout: float = START_TIMEOUT_S,
                       launcher: tuple[str, ...] = ("-m", "contiguouskv.cache_server")) -> CacheProc:
    """Start a cache server storing under ``root``; return once it has written its port file.

    ``launcher`` follows the Python executable (a ``-c`` script may wrap the server's ``main``).
    Raises ``AssertionError`` with the server's stderr if it exits or is not ready in ``timeout``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="ckv-cache-", dir=root.parent))
    port_file = run_dir / "port"
    log_path = run_dir / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *launcher, "--root", str(root),
             "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise AssertionError(
                f"cache server not ready (exit status {proc.returncode}):\n"
                f"{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.02)
    return CacheProc(proc=proc, port=int(port_file.read_text()), root=root, log_path=log_path)


def wait_for_log(server: CacheProc, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """Wait until the server's log matches ``pattern``; return the match."""
    deadline = time.monotonic() + timeout
    while (found := re.search(pattern, server.log())) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the server log:\n{server.log()}")
        time.sleep(0.02)
    return found


@pytest.fixture
def cache_server(tmp_path: Path) -> Iterator[CacheProc]:
    """A cache server on a fresh root (``tmp_path / "cache-root"``), stopped after the test."""
    server = start_cache_server(tmp_path / "cache-root")
    try:
        yield server
    finally:
        server.stop()
