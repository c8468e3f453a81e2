"""Record store, writer, reader and fetch session, without gRPC, on real files under tmp_path."""

from __future__ import annotations

import asyncio
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from contiguouskv.cache_server.assemble import BatchAssembler
from contiguouskv.cache_server.buffers import ReadBuffers
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.fetch import FetchSession
from contiguouskv.cache_server.keys import ObjectKey, check_region_name, object_paths
from contiguouskv.cache_server.manifest import stride_of
from contiguouskv.cache_server.reader import coalesce
from contiguouskv.cache_server.store import RecordStore

REGIONS = [("kv/G0", 37, 5000), ("idkeys/L0", 3, 100), ("stats", 1, 8192), ("empty", 0, 10)]


def make_records(regions: list[tuple[str, int, int]], seed: int = 0) -> dict[str, list[bytes]]:
    rng = random.Random(seed)
    return {name: [rng.randbytes(size) for _ in range(n)] for name, n, size in regions}


def put(store: RecordStore, key: ObjectKey, records: dict[str, list[bytes]], chunk: int = 4,
        metadata: bytes = b"meta"):
    regions = [(name, len(recs), len(recs[0]) if recs else 10) for name, recs in records.items()]
    writer = store.begin_put(key, regions, metadata)
    for name, recs in records.items():
        order = list(range(0, len(recs), chunk))
        random.Random(1).shuffle(order)  # chunks may come in any order
        for first in order:
            writer.write(name, first, b"".join(recs[first : first + chunk]))
    return store.commit(writer)


def assembler_of(store: RecordStore, reader, cache_bytes: int = 0) -> BatchAssembler:
    return BatchAssembler(reader, DramCache(cache_bytes, counters=store.counters),
                          ReadBuffers(1 << 20), store.counters)


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    return RecordStore(CacheServerConfig(root=tmp_path / "root"))


def test_round_trip_across_regions(store: RecordStore) -> None:
    key = ObjectKey("p1", "contiguous")
    records = make_records(REGIONS)
    result = put(store, key, records)
    assert not result.already_committed
    data_file = object_paths(store.config.root, key).data
    expected_size = sum(n * stride_of(size) for _, n, size in REGIONS)
    assert data_file.stat().st_size == expected_size == result.manifest.data_bytes
    assert result.bytes_written == expected_size
    for name, n, _ in REGIONS:
        indices = list(range(n))
        random.Random(2).shuffle(indices)
        assert store.read_records(key, name, indices) == [records[name][i] for i in indices]
    manifest = store.manifest(key)
    assert manifest.metadata == b"meta"
    assert [r.offset % 4096 for r in manifest.regions.values()] == [0] * len(REGIONS)
    assert store.stats().objects == 1 and store.stats().stored_bytes == expected_size


def test_reopened_store_serves_committed_objects(tmp_path: Path) -> None:
    config = CacheServerConfig(root=tmp_path / "root")
    records = make_records(REGIONS, seed=3)
    put(RecordStore(config), ObjectKey("p1", "x"), records)
    again = RecordStore(config)
    assert [m.key for m in again.list()] == [ObjectKey("p1", "x")]
    assert again.read_records(ObjectKey("p1", "x"), "kv/G0", [36, 0]) == [
        records["kv/G0"][36], records["kv/G0"][0]]


def test_coalesce_makes_runs_of_adjacent_indices() -> None:
    assert coalesce([]) == []
    assert coalesce([5, 3, 4, 9, 10, 0, 4]) == [(0, 1), (3, 3), (9, 2)]
    assert coalesce(list(range(100))) == [(0, 100)]


def test_adjacent_records_are_one_read(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    records = make_records([("r", 20, 5000)])
    put(store, key, records)
    before = store.stats().bytes_read_from_disk
    got = store.read_records(key, "r", [7, 3, 4, 5, 12, 7])
    assert got == [records["r"][i] for i in (7, 3, 4, 5, 12, 7)]
    # distinct records 3,4,5,7,12 -> 5 strides read, duplicates read once
    assert store.stats().bytes_read_from_disk - before == 5 * stride_of(5000)


def test_flipped_byte_is_data_loss(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    records = make_records([("r", 4, 5000)])
    put(store, key, records)
    data_file = object_paths(store.config.root, key).data
    with open(data_file, "r+b") as f:
        f.seek(2 * stride_of(5000) + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert store.read_records(key, "r", [0, 1, 3]) == [records["r"][i] for i in (0, 1, 3)]
    with pytest.raises(DataLoss, match="record 2"):
        store.read_records(key, "r", [1, 2])
    assert store.stats().checksum_failures == 1


def test_startup_removes_leftovers(tmp_path: Path) -> None:
    config = CacheServerConfig(root=tmp_path / "root")
    store = RecordStore(config)
    put(store, ObjectKey("p1", "kept"), make_records([("r", 2, 10)]))
    unfinished = store.begin_put(ObjectKey("p1", "half"), [("r", 2, 10)], b"")
    unfinished.write("r", 0, bytes(10))
    temp = unfinished.temp_path
    assert temp is not None and temp.exists()
    prefix_dir = object_paths(config.root, ObjectKey("p1", "kept")).directory
    orphan = prefix_dir / "orphan.data"  # a data file whose manifest was never written
    orphan.write_bytes(bytes(4096))
    (prefix_dir / ".tmp-deadbeef-x.manifest").write_bytes(b"{")
    other_dir = object_paths(config.root, ObjectKey("p2", "y")).directory
    other_dir.mkdir()
    (other_dir / ".tmp-0-y.data").write_bytes(b"x")
    again = RecordStore(config)  # as after a crash: the first store never finished
    assert not temp.exists() and not orphan.exists() and not other_dir.exists()
    assert sorted(p.name for p in prefix_dir.iterdir()) == ["kept.data", "kept.manifest"]
    assert [m.key.layout for m in again.list()] == ["kept"]


def test_reput_is_a_no_op(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    first = put(store, key, make_records([("r", 3, 100)]))
    data_file = object_paths(store.config.root, key).data
    mtime = data_file.stat().st_mtime_ns
    second = put(store, key, make_records([("r", 3, 100)], seed=9), metadata=b"other")
    assert second.already_committed and second.bytes_written == 0
    assert second.manifest.committed_at == first.manifest.committed_at
    assert data_file.stat().st_mtime_ns == mtime
    with pytest.raises(FailedPrecondition):
        store.begin_put(key, [("r", 4, 100)], b"")


def test_delete_one_layout_or_all(store: RecordStore) -> None:
    for layout in ("a", "b"):
        put(store, ObjectKey("p1", layout), make_records([("r", 2, 5000)]))
    put(store, ObjectKey("p2", "a"), make_records([("r", 1, 10)]))
    result = store.delete("p1", "a")
    assert (result.layouts_deleted, result.bytes_freed) == (1, 2 * 8192)
    with pytest.raises(NotFound):
        store.manifest(ObjectKey("p1", "a"))
    assert store.delete("p1").layouts_deleted == 1
    assert store.delete("p1").layouts_deleted == 0
    assert [str(m.key) for m in store.list()] == ["p2/a"]
    assert not object_paths(store.config.root, ObjectKey("p1", "b")).directory.exists()


def test_open_reader_survives_delete(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    records = make_records([("r", 3, 5000)])
    put(store, key, records)
    with store.open_object(key) as reader:
        store.delete("p1")
        assert reader.read("r", [2]) == [records["r"][2]]


@pytest.mark.parametrize("bad", ["../x", "/", "a/b", "a\x00b", "", "..", "-a", "x" * 129])
def test_keys_reject_paths(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        ObjectKey(bad, "layout")
    with pytest.raises(InvalidArgument):
        ObjectKey("prefix", bad)


def test_key_maps_to_one_place_under_root(tmp_path: Path) -> None:
    paths = object_paths(tmp_path, ObjectKey("abc-1_2", "contiguous.v1"))
    assert paths.data == tmp_path / "objects" / "abc-1_2" / "contiguous.v1.data"
    assert paths.manifest.parent == paths.data.parent
    with pytest.raises(InvalidArgument):
        ObjectKey("p", "a..b")
    with pytest.raises(InvalidArgument):
        check_region_name("")
    assert check_region_name("kv/G0") == "kv/G0"


def test_malformed_writes_are_rejected_and_leave_nothing(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    writer = store.begin_put(key, [("r", 4, 100)], b"")
    with pytest.raises(InvalidArgument, match="whole number"):
        writer.write("r", 0, bytes(150))
    with pytest.raises(InvalidArgument, match="past the end"):
        writer.write("r", 3, bytes(200))
    with pytest.raises(InvalidArgument, match="not in the header"):
        writer.write("s", 0, bytes(100))
    writer.write("r", 0, bytes(200))
    with pytest.raises(InvalidArgument, match="sent twice"):
        writer.write("r", 1, bytes(100))
    with pytest.raises(InvalidArgument, match="record 2 of region 'r' was never sent"):
        store.commit(writer)
    with pytest.raises(NotFound):
        store.manifest(key)
    assert list(object_paths(store.config.root, key).directory.iterdir()) == []
    with pytest.raises(InvalidArgument):
        store.begin_put(key, [("r", 1, 100), ("r", 1, 100)], b"")
    with pytest.raises(InvalidArgument):
        store.begin_put(key, [("r", 1, 0)], b"")


def test_store_limit_is_resource_exhausted(tmp_path: Path) -> None:
    store = RecordStore(CacheServerConfig(root=tmp_path / "root", max_store_bytes=3 * 4096))
    put(store, ObjectKey("p1", "a"), make_records([("r", 2, 4096)]))
    with pytest.raises(ResourceExhausted, match="max_store_bytes"):
        store.begin_put(ObjectKey("p1", "b"), [("r", 2, 10)], b"")
    store.abort(store.begin_put(ObjectKey("p1", "b"), [("r", 1, 10)], b""))
    store.delete("p1")
    put(store, ObjectKey("p1", "b"), make_records([("r", 3, 10)]))


async def test_fetch_session_orders_by_priority_then_arrival(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    records = make_records([("a", 10, 1000), ("b", 3, 5000)])
    put(store, key, records)
    with store.open_object(key) as reader, ThreadPoolExecutor(2) as pool:
        session = FetchSession(reader, assembler_of(store, reader), pool, store.counters, max_batch_bytes=3000,
                               max_read_bytes=1 << 20)
        session.submit(1, "a", [9, 8, 7, 6, 5], priority=5)
        session.submit(2, "b", [2, 0], priority=0)
        session.submit(3, "a", [], priority=5)
        session.submit(4, "a", [1], priority=0)
        with pytest.raises(InvalidArgument, match="tag"):
            session.submit(4, "a", [2], priority=0)
        with pytest.raises(InvalidArgument, match="index 10"):
            session.submit(5, "a", [10], priority=0)
        with pytest.raises(InvalidArgument, match="region"):
            session.submit(6, "", [0], priority=0)
        session.close_input()
        got = [(b.tag, list(b.indices), b.done) async for b in session.responses()]
        assert got == [
            (2, [2], False), (2, [0], True), (4, [1], True),
            (1, [9, 8, 7], False), (1, [6, 5], True), (3, [], True),
        ]


async def test_fetch_batches_of_tiny_records_are_capped_by_disk_bytes(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    put(store, key, make_records([("a", 10, 1000)]))
    with store.open_object(key) as reader, ThreadPoolExecutor(2) as pool:
        session = FetchSession(reader, assembler_of(store, reader), pool, store.counters, max_batch_bytes=3000,
                               max_read_bytes=8192)
        session.submit(1, "a", list(range(5)), priority=0)
        session.close_input()
        got = [list(b.indices) async for b in session.responses()]
        assert got == [[0, 1], [2, 3], [4]]


async def test_fetch_session_cancel_sends_one_cancelled_done(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    records = make_records([("a", 50, 4096)])
    put(store, key, records)
    with store.open_object(key) as reader, ThreadPoolExecutor(2) as pool:
        session = FetchSession(reader, assembler_of(store, reader), pool, store.counters, max_batch_bytes=4096)
        session.submit(1, "a", list(range(50)), priority=0)
        session.submit(2, "a", [0, 1], priority=1)
        out = []
        async for batch in session.responses():
            out.append(batch)
            if len(out) == 3:
                session.cancel([1, 99])
                session.close_input()
        tag1 = [b for b in out if b.tag == 1]
        assert [b.indices[0] for b in tag1[:3]] == [0, 1, 2]
        assert tag1[-1].cancelled and tag1[-1].done and not tag1[-1].indices
        assert sum(b.done for b in tag1) == 1 and len(tag1) == 4
        assert [(list(b.indices), b.done) for b in out if b.tag == 2] == [([0], False), ([1], True)]
        assert all(b.data == records["a"][b.indices[0]] for b in out if b.indices)


async def test_fetch_session_reads_ahead_boundedly(store: RecordStore) -> None:
    key = ObjectKey("p1", "l")
    put(store, key, make_records([("a", 64, 4096)]))
    with store.open_object(key) as reader, ThreadPoolExecutor(2) as pool:
        session = FetchSession(reader, assembler_of(store, reader), pool, store.counters, max_batch_bytes=4096, max_batches=2)
        session.submit(1, "a", list(range(64)), priority=0)
        batches = session.responses()
        await anext(batches)
        await asyncio.sleep(0.1)  # a consumer that stalls
        assert store.stats().bytes_read_from_disk <= 3 * 4096
        await batches.aclose()


def test_buffered_reads_when_direct_io_is_off(tmp_path: Path) -> None:
    store = RecordStore(CacheServerConfig(root=tmp_path / "root", direct_io=False))
    records = make_records([("r", 5, 5000)])
    put(store, ObjectKey("p1", "l"), records)
    assert not store.stats().direct_io
    assert store.read_records(ObjectKey("p1", "l"), "r", [4, 0]) == [records["r"][4], records["r"][0]]


def test_absurd_headers_are_refused_before_allocating(store: RecordStore) -> None:
    with pytest.raises(ResourceExhausted, match="free"):
        store.begin_put(ObjectKey("p1", "l"), [("r", 1 << 23, 1 << 20)], b"")  # 8 TiB
    with pytest.raises(InvalidArgument, match="records in all"):
        store.begin_put(ObjectKey("p1", "l"), [("r", 1 << 40, 1)], b"")
    assert store.list() == [] and store.stats().stored_bytes == 0


def test_raw_fetch_responses_parse_as_protobuf_and_back() -> None:
    from contiguouskv.common.fetch_wire import decode_fetch_response, encode_fetch_response
    from contiguouskv.v1 import cache_pb2 as pb

    payloads = [b"a" * 300, memoryview(b"b" * 300)]
    wire, offset = encode_fetch_response(7, "kv/G1", [5, 2**40], payloads, done=True)
    assert wire[offset:] == b"a" * 300 + b"b" * 300
    parsed = pb.FetchResponse.FromString(wire)
    assert (parsed.tag, parsed.region, list(parsed.indices), parsed.data, parsed.done) == (
        7, "kv/G1", [5, 2**40], b"a" * 300 + b"b" * 300, True)
    back = decode_fetch_response(wire)
    assert (back.tag, back.region, back.indices, bytes(back.data), back.done, back.error_code) == (
        7, "kv/G1", [5, 2**40], b"a" * 300 + b"b" * 300, True, 0)
    plain = pb.FetchResponse(tag=1, region="r", data=b"xyz", error_code=15, error_message="bad")
    decoded = decode_fetch_response(plain.SerializeToString())  # protobuf's own field order
    assert (bytes(decoded.data), decoded.error_code, decoded.error_message) == (b"xyz", 15, "bad")
    with pytest.raises(ValueError, match="truncated"):
        decode_fetch_response(wire[:-1])


def test_bench_storage_runs_on_a_tiny_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from contiguouskv.bench import storage
    from contiguouskv.cache_server.native_aio import open_native_aio

    parser = argparse.ArgumentParser()
    storage.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--tokens", "512", "--layers", "4", "--group", "2", "--sub-period", "2",
                              "--kv-heads", "1", "--head-dim", "64", "--target-mb", "1",
                              "--selections", "0.25,1.0", "--workdir", str(tmp_path / "w"),
                              "--read-threads", "2", "--rounds", "2", "--path", "grpc,shm", "--streams", "1,2",
                              "--shm-slot-bytes", "65536", "--json", str(out)])
    assert storage.run(args) == 0
    printed = capsys.readouterr().out  # each summary line says what its two sides share
    assert "shm/grpc, 2 stream(s)" in printed and "2/1 streams, shm" in printed
    report = json.loads(out.read_text())
    assert report["page_cache_resident_fraction"] == 0.0 and report["direct_io"]
    assert report["rounds"] == 2 and report["ways"] == ["grpc/1", "grpc/2", "shm/1", "shm/2"]
    assert report["shm_buffer"] == {"slots": 32, "slot_bytes": 65536}
    # the helpers' engine is the default, native AIO (one helper: 4 x 2 read threads in flight)
    assert report["read_engine"] == "aio"
    aio, _ = open_native_aio(1)
    if aio is not None:
        aio.close()
        assert report["helper_engines"] == ["native AIO, 8 reads in flight"]
    else:
        assert report["helper_engines"][0].startswith("threads (native AIO unavailable")
    assert ("helpers read by " + report["helper_engines"][0]) in printed
    rows = report["rows"]
    assert {(r["selection"], r["path"], r["source"], r["streams"]) for r in rows} == {
        (f, p, src, n) for f in (0.25, 1.0) for p in ("grpc", "shm") for src in ("disk", "dram") for n in (1, 2)}
    for row in rows:
        assert {"path", "source", "streams", "gbps", "cpu_s_per_gb", "client_cpu_s_per_gb",
                "server_cpu_s_per_gb"} <= set(row)
        assert row["gbps"] > 0 and row["cpu_s_per_gb"] == pytest.approx(
            row["client_cpu_s_per_gb"] + row["server_cpu_s_per_gb"])
        # the shared-memory path really carried the records; the gRPC path never does
        assert row["shm_fraction"] == (1.0 if row["path"] == "shm" else 0.0)
        if row["source"] == "disk":
            assert row["read_amplification"] == 1.0 and row["raw_gbps"] > 0
            # every round read the same bytes every way, from disk; the reported ratio is the median
            ratios = row["over_raw_rounds"]
            assert len(ratios) == len(row["rounds"]) == 2
            assert row["over_raw"] == pytest.approx(sum(ratios) / 2)
            assert all(run["dram_hits"] == 0 for run in row["rounds"])
            assert {run["bytes"] for run in row["rounds"]} == {r["bytes"] for r in report["raw"][str(row["selection"])]}
        else:
            assert row["dram_hits"] > 0
        # DRAM hits on the shared-memory path are read in the server's arena, never copied to a slot
        assert row["in_place_fraction"] == (1.0 if (row["path"], row["source"]) == ("shm", "dram") else 0.0)
    compares = {(c["selection"], c["source"], c["compare"]) for c in report["summary"]}
    assert (1.0, "dram", "shm/grpc") in compares and (1.0, "dram", "2/1 streams") in compares
