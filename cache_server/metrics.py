"""Prometheus metrics of the cache server, read from its counters at scrape time.

:class:`CacheCollector` turns :class:`~.stats.StatsSnapshot` into metric families named by the
Prometheus conventions (``ckv_cache_`` prefix; ``_bytes``, ``_total``, ``_seconds`` units). It is
registered in a registry owned by the server (never the global one), served over HTTP by
:func:`start_metrics_server` when ``--metrics-port`` is given.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from contiguouskv.cache_server.stats import LATENCY_BUCKETS, StatsSnapshot

logger = logging.getLogger(__name__)

PREFIX = "ckv_cache_"
# (metric name without prefix and "_total", counter name in StatsSnapshot.values, help)
COUNTERS = (
    ("disk_read_bytes", "bytes_read_from_disk", "Bytes read from disk (4 KiB-padded records)."),
    ("disk_reads", "disk_reads", "Coalesced disk read system calls."),
    ("buffered_reads", "buffered_reads", "Disk reads made without O_DIRECT (buffered fallback)."),
    ("served_bytes", "bytes_served", "Record payload bytes sent in Fetch responses."),
    ("served_records", "records_served", "Records sent in Fetch responses."),
    ("dram_served_bytes", "bytes_served_from_dram", "Record payload bytes served from DRAM."),
    ("requested_records", "records_requested", "Records asked for in Fetch reads."),
    ("requested_bytes", "bytes_requested", "Payload bytes of the records asked for."),
    ("disk_requested_bytes", "bytes_requested_from_disk",
     "Payload bytes of asked records that missed DRAM and were read from disk."),
    ("fetch_streams", "fetch_streams_total", "Fetch streams opened."),
    ("fetch_request_errors", "fetch_requests_failed",
     "Fetch reads failed alone (DATA_LOSS, ...) while their stream went on."),
    ("checksum_failures", "checksum_failures", "Records whose CRC-32 did not match on read."),
    ("dram_hits", "dram_hits", "Record lookups served by the DRAM cache."),
    ("dram_misses", "dram_misses", "Record lookups that missed the DRAM cache."),
    ("dram_evictions", "dram_evictions", "Records evicted from the DRAM cache."),
    ("dram_rejections", "dram_rejections", "Records the eviction rule did not admit."),
    ("shm_served_bytes", "bytes_served_shm", "Record payload bytes placed in clients' shared memory."),
    ("in_place_served_bytes", "bytes_served_in_place",
     "Of those, DRAM hits the clients read in place in the DRAM cache's shared arenas."),
)
GAUGES = (
    ("inflight_streams", "inflight_streams", "Fetch streams open now."),
    ("inflight_reads", "inflight_reads", "Batch disk reads running now."),
    ("inflight_bytes", "inflight_bytes", "Record bytes held by Fetch streams now."),
    ("shm_planes", "shm_planes", "Shared-memory data planes open now (co-located clients)."),
    ("shm_slots_lent", "shm_slots_lent", "Shared-memory slots being written or held by clients now."),
    ("shm_leases", "shm_leases", "DRAM-arena batches held by shared-memory clients now."),
)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


class CacheCollector(Collector):
    """Collects the server's metrics from ``snapshot()`` on every scrape."""

    def __init__(self, snapshot: Callable[[], StatsSnapshot], latency: Callable[[], tuple[list[int], float]],
                 refusals: Callable[[], Mapping[str, int]] = dict) -> None:
        self._snapshot = snapshot
        self._latency = latency
        self._refusals = refusals

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        v = s.values
        for name, key, text in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, text, value=v[key])
        for name, key, text in GAUGES:
            yield GaugeMetricFamily(PREFIX + name, text, value=v[key])
        gauges = (
            ("stored_bytes", "Bytes of committed data files.", s.stored_bytes),
            ("objects", "Committed (prefix, layout) objects.", s.objects),
            ("dram_bytes", "Bytes of records held in the DRAM cache.", s.dram_bytes),
            ("dram_budget_bytes", "Byte budget of the DRAM cache.", s.dram_budget_bytes),
            ("direct_io", "1 when reads use O_DIRECT, 0 on the buffered fallback.", int(s.direct_io)),
            ("dram_hit_ratio", "DRAM hits / (hits + misses) since start.",
             _ratio(v["dram_hits"], v["dram_hits"] + v["dram_misses"])),
            ("read_amplification_ratio",
             "Bytes read from disk / payload bytes of the records read from disk (1.0 = exact).",
             _ratio(v["bytes_read_from_disk"], v["bytes_requested_from_disk"])),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, text, value=value)
        refused = CounterMetricFamily(PREFIX + "refused_calls", "Calls refused before the servicer: no or bad "
                                      "token, missing scope, too many in flight (by status).", labels=["status"])
        for status in ("UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"):
            refused.add_metric([status], self._refusals().get(status, 0))
        yield refused
        counts, total = self._latency()
        cumulative = list(itertools.accumulate(counts))
        bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            PREFIX + "disk_read_seconds", "Latency of one batch's disk reads (coalesced runs).",
            buckets=list(zip(bounds, cumulative)), sum_value=total)


def start_metrics_server(host: str, port: int, collector: Collector) -> WSGIServer:
    """Serve ``collector`` at ``http://host:port/metrics`` on a daemon thread; returns the server.

    Port 0 binds a free port; the bound one is logged. Stop it with ``shutdown()``.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    logger.info("metrics on http://%s:%d/metrics", host, httpd.server_port)
    return httpd
