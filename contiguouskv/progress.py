"""Progress for people at a terminal: a bar when the total is known, else a spinner with elapsed time.

Draws on stderr only when it is a terminal; in pipes, CI logs and scripts it stays silent except
for :meth:`Progress.write` lines. A daemon thread redraws a few times a second, so a blocking call
(a registration, which the server does not report progress of) still shows time passing.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

SPINNER = "|/-\\"
BAR_WIDTH = 24


def render(label: str, elapsed_s: float, done: int = 0, total: int | None = None, tick: int = 0) -> str:
    """One line: ``label [#####.....] 3/10 12.3s`` with a total, else ``| label 12.3s``."""
    if total:
        filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"{label} [{bar}] {done}/{total} {elapsed_s:.1f}s"
    return f"{SPINNER[tick % len(SPINNER)]} {label} {elapsed_s:.1f}s"


class Progress:
    """``with Progress("registering"):`` shows a spinner; ``Progress(label, total=n)`` a bar that
    :meth:`advance` moves. ``enabled`` defaults to whether ``stream`` (stderr) is a terminal."""

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 enabled: bool | None = None, interval_s: float = 0.1) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._interval_s = interval_s
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticks = 0

    def __enter__(self) -> "Progress":
        self._start = time.monotonic()
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="ckv-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._clear()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._draw()

    def write(self, message: str) -> None:
        """Print ``message`` as its own line (above the bar when one is drawn)."""
        with self._lock:
            self._clear()
            print(message, file=self._stream, flush=True)
            self._draw()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                self._ticks += 1
                self._draw()

    def _draw(self) -> None:
        if self.enabled:
            line = render(self.label, time.monotonic() - self._start, self.done, self.total, self._ticks)
            self._stream.write("\r\x1b[K" + line)
            self._stream.flush()

    def _clear(self) -> None:
        if self.enabled:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
