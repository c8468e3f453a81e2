"""Counters, gauges and the read-latency histogram of one cache server, safe from any thread.

The plain classes (store, reader, fetch session, DRAM cache) bump these; ``GetStats`` and the
Prometheus collector (:mod:`.metrics`) read them. Nothing here imports prometheus_client.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading

COUNTER_NAMES = (
    "bytes_read_from_disk",  # padded bytes read by disk reads (what the device delivered)
    "disk_reads",  # coalesced read system calls
    "buffered_reads",  # of which without O_DIRECT
    "bytes_served",  # record payload bytes sent in Fetch responses
    "records_served",
    "bytes_served_from_dram",
    "records_requested",  # records asked for in Fetch reads
    "bytes_requested",  # payload bytes of those records
    "bytes_requested_from_disk",  # payload bytes of the asked records that missed the DRAM cache
    "fetch_streams_total",
    "fetch_requests_failed",  # per-request errors (DATA_LOSS, ...) sent on a live stream
    "checksum_failures",
    "dram_hits",
    "dram_misses",
    "dram_evictions",
    "dram_rejections",  # records the policy did not admit
    "bytes_served_shm",  # of bytes_served, those placed in a client's shared memory (descriptors sent)
    "bytes_served_in_place",  # of bytes_served_shm, DRAM hits read by the client in the DRAM cache's arena
)
GAUGE_NAMES = (
    "inflight_streams",
    "inflight_reads",  # batch reads running on the read pool
    "inflight_bytes",  # payload bytes held by Fetch streams (being read, or waiting to be sent)
    "shm_planes",  # shared-memory planes open (co-located clients)
    "shm_slots_lent",  # slots of those planes written or held by their clients
    "shm_leases",  # DRAM-arena batches lent to those clients and not yet given back
)
# Upper bounds (seconds) of the read-latency histogram; one batch read = one observation.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclasses.dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Counters and gauges at one moment, plus the store's size and the DRAM cache's fill."""

    objects: int
    stored_bytes: int
    direct_io: bool
    dram_bytes: int
    dram_budget_bytes: int
    eviction_rule: str  # "" without a cache
    values: dict[str, int]

    def __getattr__(self, name: str) -> int:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


class Counters:
    """Monotonic counters (``COUNTER_NAMES``), gauges (``GAUGE_NAMES``) and a latency histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTER_NAMES + GAUGE_NAMES, 0)
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0

    def add(self, **deltas: int) -> None:
        """Add each ``name=delta`` (gauges take negative deltas); an unknown name is a ``KeyError``."""
        with self._lock:
            for name, delta in deltas.items():
                if name not in self._values:
                    raise KeyError(name)
                self._values[name] += delta

    def observe_read(self, seconds: float) -> None:
        """Count one disk read of a batch that took ``seconds``."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._buckets[slot] += 1
            self._latency_sum += seconds

    def values(self) -> dict[str, int]:
        """A copy of every counter and gauge."""
        with self._lock:
            return dict(self._values)

    def latency(self) -> tuple[list[int], float]:
        """Per-bucket counts (not cumulative; the last is +Inf) and the sum of seconds."""
        with self._lock:
            return list(self._buckets), self._latency_sum
