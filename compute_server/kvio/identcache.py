"""Identification data of hot prefixes, resident in the compute server (a per-prefix LRU under a byte budget).

Every request on a prefix reads the same identification records (``qkeys``, ``minmax``,
``digest``, ``idkeys`` of each scored layer); a request that finds them here reads only the K/V
it selects. Entries are whole records, copied out of the receive buffers, keyed by
(prefix id, layout name, region). Eviction drops the least recently used *prefix* as a whole: a
prefix with half its layers resident still pays the identification I/O of the other half.
One object per server, shared by every request (thread-safe).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class IdentCacheStats:
    max_bytes: int
    bytes: int
    prefixes: int
    hits: int
    misses: int
    evicted_prefixes: int


class IdentCache:
    """Whole identification records per (prefix, layout, region); see the module docstring."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._prefixes: OrderedDict[tuple[str, str], dict[str, tuple[bytes, ...]]] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self._bytes = 0
        self._hits = self._misses = self._evicted = 0

    def get(self, prefix_id: str, layout: str, region: str) -> tuple[bytes, ...] | None:
        """The records of ``region`` when resident (the prefix becomes most recently used)."""
        key = (prefix_id, layout)
        with self._lock:
            records = self._prefixes.get(key, {}).get(region)
            if records is None:
                self._misses += 1
                return None
            self._hits += 1
            self._prefixes.move_to_end(key)
            return records

    def put(self, prefix_id: str, layout: str, region: str, records: tuple[bytes, ...]) -> bool:
        """Keep ``records``, evicting least recently used prefixes (never this one) to make room.

        Returns False when they do not fit even with every other prefix evicted.
        """
        size = sum(len(r) for r in records)
        key = (prefix_id, layout)
        with self._lock:
            if size > self.max_bytes:  # could never fit: refuse without evicting anyone
                return False
            regions = self._prefixes.setdefault(key, {})
            self._prefixes.move_to_end(key)
            if region in regions:
                return True
            while self._bytes + size > self.max_bytes and len(self._prefixes) > 1:
                victim = next(iter(self._prefixes))
                self._drop(victim)
            if self._bytes + size > self.max_bytes:
                if not regions:
                    del self._prefixes[key]
                return False
            regions[region] = records
            self._sizes[key] = self._sizes.get(key, 0) + size
            self._bytes += size
            return True

    def forget(self, prefix_id: str) -> None:
        """Drop a prefix (every layout), e.g. when it is deleted from the store."""
        with self._lock:
            for key in [k for k in self._prefixes if k[0] == prefix_id]:
                self._drop(key, evicted=False)

    def stats(self) -> IdentCacheStats:
        with self._lock:
            return IdentCacheStats(self.max_bytes, self._bytes, len(self._prefixes), self._hits, self._misses,
                                   self._evicted)

    def _drop(self, key: tuple[str, str], evicted: bool = True) -> None:
        del self._prefixes[key]
        self._bytes -= self._sizes.pop(key, 0)
        self._evicted += evicted
