"""Counters of the store and the reader, safe to bump from any thread."""

from __future__ import annotations

import dataclasses
import threading

COUNTER_NAMES = (
    "bytes_read_from_disk",
    "bytes_served",
    "records_served",
    "fetch_streams_total",
    "checksum_failures",
)


@dataclasses.dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Store and reader counters at one moment (all since start, except the store's size)."""

    objects: int
    stored_bytes: int
    bytes_read_from_disk: int
    bytes_served: int
    records_served: int
    fetch_streams_total: int
    checksum_failures: int
    direct_io: bool


class Counters:
    """Monotonic counters named in ``COUNTER_NAMES``; ``add`` and ``values`` take a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTER_NAMES, 0)

    def add(self, **deltas: int) -> None:
        """Add each ``name=delta``; an unknown name is a ``KeyError`` (a programming error)."""
        with self._lock:
            for name, delta in deltas.items():
                if name not in self._values:
                    raise KeyError(name)
                self._values[name] += delta

    def values(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._values)
