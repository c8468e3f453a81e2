"""The DRAM cache: eviction rules and byte budget (plain objects), then hits, ReportAttention and metrics
through a real cache server process."""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CacheProc, start_cache_server, wait_for_log
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.eviction import EVICTION_RULES
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.stats import Counters
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc
from test_cache_server import OPTIONS, expect_status, fetch, open_, put, put_requests, read, records_of

OBJ = (ObjectKey("p", "l"), 1.0)
REC = memoryview(bytes(100))


def cache_of(rule: str, records: int = 3) -> DramCache:
    return DramCache(records * len(REC), rule, Counters())


def fill(cache: DramCache, indices: list[int]) -> None:
    for i in indices:
        cache.lookup(OBJ, "r", [i])
        cache.admit(OBJ, "r", [(i, REC)])


def cached(cache: DramCache, indices: range) -> list[int]:
    return [i for i in indices if cache.contains(OBJ, "r", i)]


def test_lru_evicts_the_least_recently_used() -> None:
    cache = cache_of("lru")
    fill(cache, [0, 1, 2])
    cache.lookup(OBJ, "r", [0])
    fill(cache, [3])
    assert cached(cache, range(4)) == [0, 2, 3] and cache.used_bytes == 300


def test_lfu_evicts_the_least_frequently_used() -> None:
    cache = cache_of("lfu")
    fill(cache, [0, 1, 2])
    cache.lookup(OBJ, "r", [0, 0, 2])
    fill(cache, [3])  # 3 was asked once, like 1 (the older): 1 goes
    assert cached(cache, range(4)) == [0, 2, 3]


def test_attention_keeps_high_attention_times_frequency() -> None:
    cache = cache_of("attention")
    fill(cache, [0, 1, 2])
    cache.report(OBJ, "r", [0, 1, 2], [5.0, 0.1, 1.0], None)
    cache.lookup(OBJ, "r", [1])  # 1: 0.1 x 2 = 0.2 < 2: 1.0 x 1 < 0: 5.0
    fill(cache, [3])  # unreported (score 0): not worth evicting a scored record
    assert cached(cache, range(4)) == [0, 1, 2]
    cache.report(OBJ, "r", [3], [3.0], None)
    fill(cache, [3])  # now 3 scores 3.0 x 2 = 6: it evicts the lowest, 1
    assert cached(cache, range(4)) == [0, 2, 3]
    stats = cache.stats_of(OBJ, "r", 3)
    assert stats is not None and stats.frequency == 2 and math.isclose(stats.attention, 3.0)


def test_impress_uses_frequency_times_important_fraction() -> None:
    cache = cache_of("impress")
    fill(cache, [0, 1, 2])
    cache.report(OBJ, "r", [0, 1, 2], [0.0, 9.0, 0.0], [0.9, 0.1, 0.5])
    cache.report(OBJ, "r", [3], [0.0], [0.8])
    fill(cache, [3])  # 3: 1 x 0.8 beats 1: 1 x 0.1 (attention does not count here)
    assert cached(cache, range(4)) == [0, 2, 3]


def test_budget_admission_and_drop() -> None:
    counters = Counters()
    cache = DramCache(250, "lru", counters)
    fill(cache, [0, 1, 2])
    assert cache.used_bytes == 200 and cache.entries == 2
    assert cache.admit(OBJ, "r", [(9, memoryview(bytes(251)))]) == 0  # larger than the budget
    cache.lookup(OBJ, "r", [1, 2, 5])
    values = counters.values()
    assert (values["dram_hits"], values["dram_evictions"], values["dram_rejections"]) == (2, 1, 1)
    other = (ObjectKey("p", "l"), 2.0)  # the same key committed again: never the old bytes
    assert cache.lookup(other, "r", [1]) == [None]
    cache.drop_object(ObjectKey("p", "l"))
    assert cache.entries == 0 and cache.used_bytes == 0 and cache.stats_of(OBJ, "r", 1) is None
    assert DramCache(0).lookup(OBJ, "r", [1]) == [None] and not DramCache(0).enabled


@settings(max_examples=300, deadline=None)
@given(rule=st.sampled_from(sorted(EVICTION_RULES)),
       ops=st.lists(st.tuples(st.sampled_from(["get", "report"]), st.integers(0, 11),
                              st.floats(0.0, 1.0, allow_nan=False)), min_size=1, max_size=120))
def test_the_lazy_heap_evicts_as_an_eager_scan_would(rule: str, ops: list[tuple[str, int, float]]) -> None:
    """Hits do not re-rank their heap entries; whatever the rule, the cache must still keep what a
    cache evicting the record of lowest current priority (a full scan) keeps, op for op."""
    capacity, priority = 4, EVICTION_RULES[rule]
    cache = cache_of(rule, capacity)
    kept: set[int] = set()  # the reference: an eager scan over every cached record
    for op, index, value in ops:
        if op == "report":
            cache.report(OBJ, "r", [index], [value], [value])
            continue
        hit = cache.lookup(OBJ, "r", [index])[0] is not None
        assert hit == (index in kept)
        if hit:
            continue
        cache.admit(OBJ, "r", [(index, REC)])
        mine = priority(cache.stats_of(OBJ, "r", index))
        if len(kept) < capacity:
            kept.add(index)
        else:
            lowest = min(kept, key=lambda i: priority(cache.stats_of(OBJ, "r", i)))
            if priority(cache.stats_of(OBJ, "r", lowest)) < mine:
                kept = (kept - {lowest}) | {index}
        assert set(cached(cache, range(12))) == kept


def test_an_unknown_eviction_rule_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="eviction rule 'fifo' is not one of attention, lru, lfu, impress"):
        DramCache(100, "fifo")
    assert DramCache(100, "lfu").eviction_rule == "lfu"


# -- through a server ----------------------------------------------------------------------

RECORD = 4096
RECORDS = records_of([("kv/G0", 16, RECORD)], seed=21)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheProc]:
    proc = start_cache_server(tmp_path_factory.mktemp("dram") / "root",
                              "--dram-cache-bytes", str(4 * RECORD), "--metrics-port", "0")
    yield proc
    assert proc.stop() == 0


async def _stats(stub: cache_pb2_grpc.CacheServiceStub) -> pb.GetStatsResponse:
    return await stub.GetStats(pb.GetStatsRequest(), timeout=10)


async def _get(stub: cache_pb2_grpc.CacheServiceStub, indices: list[int]) -> None:
    got = await fetch(stub, [open_("hot"), read(1, "kv/G0", indices)])
    assert b"".join(r.data for r in got) == b"".join(RECORDS["kv/G0"][i] for i in indices)


def _report(indices: list[int], attention: list[float],
            important: list[float] | None = None, region: str = "kv/G0",
            prefix: str = "hot") -> pb.ReportAttentionRequest:
    return pb.ReportAttentionRequest(prefix_id=prefix, layout="l", records=[pb.RecordScores(
        region=region, indices=indices, attention=attention, important_fraction=important or [])])


def test_attention_reports_decide_what_the_server_keeps(server: CacheProc) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("hot", "l", RECORDS))
            s0 = await _stats(stub)
            assert s0.cache_policy == "attention" and s0.dram_budget_bytes == 4 * RECORD  # the eviction rule
            await _get(stub, [0, 1, 2, 3])  # misses; cached (there is room)
            reply = await stub.ReportAttention(_report([0, 1, 2, 3], [2.0, 2.0, 2.0, 2.0]))
            assert reply.records_updated == 4
            await _get(stub, [4, 5, 6, 7])  # unreported: not admitted over scored records
            await _get(stub, [0, 1, 2, 3])  # all four still in DRAM
            s1 = await _stats(stub)
            assert (s1.dram_hits - s0.dram_hits, s1.dram_misses - s0.dram_misses) == (4, 8)
            assert s1.bytes_served_from_dram - s0.bytes_served_from_dram == 4 * RECORD
            assert s1.dram_bytes == 4 * RECORD and s1.dram_evictions == s0.dram_evictions
            # a deleted prefix leaves the cache too
            await stub.DeletePrefix(pb.DeletePrefixRequest(prefix_id="hot"))
            assert (await _stats(stub)).dram_bytes == 0
            await put(stub, put_requests("hot", "l", RECORDS))

    asyncio.run(scenario())


@pytest.mark.parametrize("request_, code, words", [
    (_report([0], [1.0], prefix="nope"), grpc.StatusCode.NOT_FOUND, ("nope",)),
    (_report([0], [1.0], prefix="../x"), grpc.StatusCode.INVALID_ARGUMENT, ("prefix_id",)),
    (_report([0], [1.0], region="zz"), grpc.StatusCode.INVALID_ARGUMENT, ("zz",)),
    (_report([16], [1.0]), grpc.StatusCode.INVALID_ARGUMENT, ("index 16",)),
    (_report([0, 1], [1.0]), grpc.StatusCode.INVALID_ARGUMENT, ("attention",)),
    (_report([0], [1.0], [0.5, 0.5]), grpc.StatusCode.INVALID_ARGUMENT, ("important_fraction",)),
    (_report([0], [float("nan")]), grpc.StatusCode.INVALID_ARGUMENT, ("finite",)),
    (_report([0], [-1.0]), grpc.StatusCode.INVALID_ARGUMENT, ("finite",)),
    (_report([0], [1.0], [1.5]), grpc.StatusCode.INVALID_ARGUMENT, ("[0, 1]",)),
])
def test_bad_attention_reports(server: CacheProc, request_: pb.ReportAttentionRequest,
                               code: grpc.StatusCode, words: tuple[str, ...]) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            if not (await stub.ListPrefixes(pb.ListPrefixesRequest(prefix_id="hot"))).manifests:
                await put(stub, put_requests("hot", "l", RECORDS))
            await expect_status(code, stub.ReportAttention(request_, timeout=10), *words)

    asyncio.run(scenario())


def test_metrics_endpoint(server: CacheProc) -> None:
    port = int(wait_for_log(server, r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))

    async def traffic() -> None:
        async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            if not (await stub.ListPrefixes(pb.ListPrefixesRequest(prefix_id="hot"))).manifests:
                await put(stub, put_requests("hot", "l", RECORDS))
            await _get(stub, [8, 9, 10])
            await _get(stub, [8])

    asyncio.run(traffic())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("disk_read_bytes_total", "dram_served_bytes_total", "requested_records_total",
                 "requested_bytes_total", "dram_hits_total", "dram_misses_total",
                 "dram_evictions_total", "checksum_failures_total", "fetch_streams_total",
                 "inflight_streams", "inflight_reads", "inflight_bytes", "dram_bytes",
                 "stored_bytes", "direct_io", "disk_read_seconds_count", "buffered_reads_total"):
        assert f"ckv_cache_{name}" in samples, name
    assert samples["ckv_cache_read_amplification_ratio"] == 1.0  # 4 KiB records: exact reads
    assert samples["ckv_cache_requested_records_total"] >= 4
    assert 0 < samples["ckv_cache_dram_hit_ratio"] < 1
    assert samples['ckv_cache_disk_read_seconds_bucket{le="+Inf"}'] >= 1
    assert samples["ckv_cache_inflight_streams"] == 0 and samples["ckv_cache_inflight_bytes"] == 0
    assert samples["ckv_cache_direct_io"] == 1.0
