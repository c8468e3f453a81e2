"""The cache server through gRPC: a real server subprocess on 127.0.0.1, real files under tmp_path."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import CacheProc, start_cache_server
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc

SERVER_MAX_BATCH = 64 * 1024
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
Records = dict[str, list[bytes]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheProc]:
    proc = start_cache_server(tmp_path_factory.mktemp("cache") / "root",
                              "--max-batch-bytes", str(SERVER_MAX_BATCH))
    yield proc
    assert proc.stop() == 0


@pytest.fixture
async def stub(server: CacheProc) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


def records_of(spec: Sequence[tuple[str, int, int]], seed: int = 0) -> Records:
    rng = random.Random(seed)
    return {name: [rng.randbytes(size) for _ in range(n)] for name, n, size in spec}


def put_requests(prefix_id: str, layout: str, records: Records, chunk: int = 7,
                 metadata: bytes = b"m") -> list[pb.PutPrefixRequest]:
    regions = [pb.RegionSpec(name=n, num_records=len(r), record_size=len(r[0])) for n, r in records.items()]
    out = [pb.PutPrefixRequest(header=pb.PutPrefixHeader(
        prefix_id=prefix_id, layout=layout, regions=regions, metadata=metadata))]
    for name, recs in records.items():
        for first in range(0, len(recs), chunk):
            out.append(pb.PutPrefixRequest(data=pb.PutPrefixData(
                region=name, first_record=first, data=b"".join(recs[first : first + chunk]))))
    out.append(pb.PutPrefixRequest(commit=pb.PutPrefixCommit()))
    return out


async def put(stub: cache_pb2_grpc.CacheServiceStub, requests: list[pb.PutPrefixRequest]) -> pb.PutPrefixResponse:
    async def stream() -> AsyncIterator[pb.PutPrefixRequest]:
        for request in requests:
            yield request

    return await stub.PutPrefix(stream(), timeout=30)


def read(tag: int, region: str, indices: Sequence[int], priority: int = 0) -> pb.FetchRequest:
    return pb.FetchRequest(read=pb.FetchRead(tag=tag, region=region, indices=indices, priority=priority))


def open_(prefix_id: str, layout: str = "l", max_batch_bytes: int = 0) -> pb.FetchRequest:
    return pb.FetchRequest(open=pb.FetchOpen(prefix_id=prefix_id, layout=layout,
                                             max_batch_bytes=max_batch_bytes))


async def fetch(stub: cache_pb2_grpc.CacheServiceStub, requests: Sequence[pb.FetchRequest]) -> list[pb.FetchResponse]:
    """Write every request, half-close, then read every response."""
    call = stub.Fetch(timeout=30)
    for request in requests:
        await call.write(request)
    await call.done_writing()
    return await read_all(call)


async def read_all(call: grpc.aio.StreamStreamCall) -> list[pb.FetchResponse]:
    """Read responses until the server ends the stream."""
    out = []
    while (response := await call.read()) is not grpc.aio.EOF:
        out.append(response)
    return out


async def wait_until_stalled(stub: cache_pb2_grpc.CacheServiceStub, timeout: float = 10.0) -> None:
    """Wait until the server's bytes_served stops growing (a stream blocked on flow control)."""
    last = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served = (await stub.GetStats(pb.GetStatsRequest())).bytes_served
        if served == last:
            return
        last = served
        await asyncio.sleep(0.2)
    raise AssertionError("the server kept sending to a client that reads nothing")


async def expect_status(code: grpc.StatusCode, awaitable: object, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    for word in words:
        assert word in info.value.details()


async def test_put_manifest_fetch_round_trip(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    records = records_of([("kv/G0", 40, 5000), ("stats", 2, 300)])
    reply = await put(stub, put_requests("rt", "l", records, metadata=b"hello"))
    assert not reply.already_committed and reply.bytes_written == 40 * 8192 + 2 * 4096
    manifest = (await stub.GetManifest(pb.GetManifestRequest(prefix_id="rt", layout="l"))).manifest
    assert manifest.metadata == b"hello" and manifest.total_bytes == reply.bytes_written
    assert [(r.name, r.num_records, r.record_size) for r in manifest.regions] == [
        ("kv/G0", 40, 5000), ("stats", 2, 300)]
    wanted = [39, 0, 1, 2, 17, 18, 5]
    responses = await fetch(stub, [open_("rt", max_batch_bytes=12000), read(7, "kv/G0", wanted),
                                   read(8, "stats", [1, 0], priority=-1)])
    for tag, region, indices in ((7, "kv/G0", wanted), (8, "stats", [1, 0])):
        mine = [r for r in responses if r.tag == tag]
        assert [i for r in mine for i in r.indices] == indices
        assert b"".join(r.data for r in mine) == b"".join(records[region][i] for i in indices)
        assert [r.done for r in mine] == [False] * (len(mine) - 1) + [True]
        assert all(len(r.data) <= 12000 and r.region == region for r in mine)
    assert len([r for r in responses if r.tag == 7]) == 4  # 2 + 2 + 2 + 1 records of 5000 bytes
    again = await put(stub, put_requests("rt", "l", records))
    assert again.already_committed and again.bytes_written == 0
    assert again.manifest.committed_at == manifest.committed_at


async def test_priorities_order_requests(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    big = 2000  # 8 MiB in 4 KiB batches: far more than gRPC buffers before the client reads
    records = records_of([("a", big, 4096), ("b", 4, 4096)], seed=1)
    await put(stub, put_requests("prio", "l", records, chunk=256))
    call = stub.Fetch(timeout=30)
    await call.write(open_("prio", max_batch_bytes=4096))
    await call.write(read(1, "a", range(big), priority=5))
    # The client reads nothing yet, so the server soon blocks on flow control inside tag 1;
    # everything below is then queued together and served by priority, then arrival.
    await wait_until_stalled(stub)
    for request in (read(2, "b", [0, 1], priority=9), read(3, "b", [2, 3], priority=1),
                    read(4, "b", [3, 2], priority=1), read(5, "b", [], priority=-3)):
        await call.write(request)
    await call.done_writing()
    responses = await read_all(call)
    tags = [r.tag for r in responses]
    assert len(responses) == big + 7 and all(len(r.data) <= 4096 for r in responses)
    k = tags.index(5)  # tag 1 was preempted after k batches (those gRPC took while blocked)
    assert 0 < k < big
    assert tags == [1] * k + [5, 3, 3, 4, 4] + [1] * (big - k) + [2, 2]
    empty = responses[tags.index(5)]
    assert empty.done and not empty.indices and not empty.data
    assert b"".join(r.data for r in responses if r.tag == 1) == b"".join(records["a"])


async def test_cancel_drops_unserved_records(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    records = records_of([("a", 500, 4096)], seed=2)
    await put(stub, put_requests("cancel", "l", records, chunk=100))
    call = stub.Fetch(timeout=30)
    await call.write(open_("cancel", max_batch_bytes=4096))
    await call.write(read(1, "a", range(500)))
    first = await call.read()
    assert first.tag == 1 and list(first.indices) == [0] and not first.done
    await call.write(pb.FetchRequest(cancel=pb.FetchCancel(tags=[1, 12345])))
    await call.write(read(2, "a", [499]))
    await call.done_writing()
    rest = [first] + await read_all(call)
    tag1 = [r for r in rest if r.tag == 1]
    assert tag1[-1].done and tag1[-1].cancelled and not tag1[-1].data
    assert sum(r.done for r in tag1) == 1 and len(tag1) < 500
    served = [i for r in tag1 for i in r.indices]
    assert served == list(range(len(served)))
    assert [(list(r.indices), r.done, r.cancelled) for r in rest if r.tag == 2] == [([499], True, False)]
    assert await call.code() == grpc.StatusCode.OK


async def test_several_reads_in_one_message_are_served_and_cancelled_each_alone(
        stub: cache_pb2_grpc.CacheServiceStub) -> None:
    records = records_of([("a", 300, 4096), ("b", 3, 1000)], seed=4)
    await put(stub, put_requests("reads", "l", records, chunk=100))
    call = stub.Fetch(timeout=30)
    await call.write(open_("reads", max_batch_bytes=4096))
    await call.write(pb.FetchRequest(reads=pb.FetchReads(reads=[
        pb.FetchRead(tag=1, region="a", indices=range(300)),
        pb.FetchRead(tag=2, region="b", indices=[2, 0]),
        pb.FetchRead(tag=3, region="a", indices=[7], priority=-1)])))
    first = await call.read()
    assert first.tag == 3 and list(first.indices) == [7] and first.done  # priorities hold across one message
    await call.write(pb.FetchRequest(cancel=pb.FetchCancel(tags=[1])))  # tag 1 alone
    await call.done_writing()
    rest = await read_all(call)
    tag1 = [r for r in rest if r.tag == 1]
    assert tag1[-1].done and tag1[-1].cancelled and len(tag1) < 300
    tag2 = [r for r in rest if r.tag == 2]
    assert [i for r in tag2 for i in r.indices] == [2, 0] and tag2[-1].done and not tag2[-1].cancelled
    assert b"".join(r.data for r in tag2) == records["b"][2] + records["b"][0]
    assert await call.code() == grpc.StatusCode.OK


async def test_slow_consumer_does_not_make_the_server_read_ahead(
    stub: cache_pb2_grpc.CacheServiceStub,
) -> None:
    records = records_of([("a", 4096, 4096)], seed=3)  # 16 MiB
    await put(stub, put_requests("slow", "l", records, chunk=512))
    before = (await stub.GetStats(pb.GetStatsRequest())).bytes_read_from_disk
    call = stub.Fetch(timeout=30)
    await call.write(open_("slow", max_batch_bytes=4096))
    await call.write(read(1, "a", range(4096)))
    await call.read()
    await wait_until_stalled(stub)
    read_so_far = (await stub.GetStats(pb.GetStatsRequest())).bytes_read_from_disk - before
    # gRPC buffers a few MiB of responses; the server may read only a few batches beyond that
    assert read_so_far < 8 << 20, f"read {read_so_far} bytes for a client that took one batch"
    call.cancel()


async def test_not_found_and_invalid_arguments(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await put(stub, put_requests("inv", "l", records_of([("a", 3, 100)])))
    NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    await expect_status(NOT_FOUND, stub.GetManifest(pb.GetManifestRequest(prefix_id="nope", layout="l")))
    await expect_status(NOT_FOUND, fetch(stub, [open_("nope")]), "nope")
    await expect_status(INVALID, stub.GetManifest(pb.GetManifestRequest(prefix_id="../x", layout="l")),
                        "prefix_id")
    await expect_status(INVALID, fetch(stub, [open_("inv", layout="a/b")]), "layout")
    await expect_status(INVALID, fetch(stub, [open_("inv"), read(1, "zz", [0])]), "region", "zz")
    await expect_status(INVALID, fetch(stub, [open_("inv"), read(1, "", [0])]), "region")
    await expect_status(INVALID, fetch(stub, [open_("inv"), read(1, "a", [0, 3])]), "index 3")
    await expect_status(INVALID, fetch(stub, [read(1, "a", [0])]), "open")
    await expect_status(INVALID, fetch(stub, [open_("inv"), open_("inv")]), "open")
    await expect_status(INVALID, stub.DeletePrefix(pb.DeletePrefixRequest(prefix_id="")), "prefix_id")


@pytest.mark.parametrize("case", ["data_first", "bad_length", "past_end", "missing", "no_commit",
                                  "two_headers", "duplicate"])
async def test_malformed_put_leaves_nothing(stub: cache_pb2_grpc.CacheServiceStub, server: CacheProc,
                                            case: str) -> None:
    prefix = f"bad-{case.replace('_', '-')}"
    good = put_requests(prefix, "l", records_of([("a", 4, 100)]), chunk=2)
    header, data0, data1, commit = good
    bad_data = pb.PutPrefixRequest(data=pb.PutPrefixData(region="a", first_record=0, data=bytes(150)))
    past_end = pb.PutPrefixRequest(data=pb.PutPrefixData(region="a", first_record=3, data=bytes(200)))
    requests = {
        "data_first": [data0, header, data1, commit],
        "bad_length": [header, bad_data, commit],
        "past_end": [header, data0, past_end, commit],
        "missing": [header, data0, commit],
        "no_commit": [header, data0, data1],
        "two_headers": [header, header, data0, data1, commit],
        "duplicate": [header, data0, data0, data1, commit],
    }[case]
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, put(stub, requests))
    listed = await stub.ListPrefixes(pb.ListPrefixesRequest(prefix_id=prefix))
    assert list(listed.manifests) == []
    prefix_dir = server.root / "objects" / prefix
    for _ in range(50):  # the server drops the temp file as the call ends
        if not prefix_dir.exists() or not any(prefix_dir.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert not prefix_dir.exists() or not any(prefix_dir.iterdir())
    assert not (await put(stub, good)).already_committed  # and the server keeps serving


async def test_cancelled_put_leaves_nothing(stub: cache_pb2_grpc.CacheServiceStub,
                                            server: CacheProc) -> None:
    header, data0, *_ = put_requests("put-cancel", "l", records_of([("a", 64, 4096)]), chunk=8)
    call = stub.PutPrefix(timeout=30)
    await call.write(header)
    await call.write(data0)
    prefix_dir = server.root / "objects" / "put-cancel"
    for _ in range(100):  # the temp file exists while the put is open
        if prefix_dir.exists() and any(prefix_dir.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert any(prefix_dir.iterdir())
    call.cancel()
    for _ in range(100):
        if not any(prefix_dir.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert list(prefix_dir.iterdir()) == []
    listed = await stub.ListPrefixes(pb.ListPrefixesRequest(prefix_id="put-cancel"))
    assert list(listed.manifests) == []


async def test_list_delete_and_stats(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    before = await stub.GetStats(pb.GetStatsRequest())
    for layout in ("x", "y"):
        await put(stub, put_requests("lst", layout, records_of([("a", 2, 4096)]), metadata=b"big"))
    listed = await stub.ListPrefixes(pb.ListPrefixesRequest(prefix_id="lst"))
    assert [(m.prefix_id, m.layout, m.metadata) for m in listed.manifests] == [
        ("lst", "x", b""), ("lst", "y", b"")]
    all_listed = await stub.ListPrefixes(pb.ListPrefixesRequest())
    assert {"lst"} < {m.prefix_id for m in all_listed.manifests}
    await fetch(stub, [open_("lst", "x"), read(1, "a", [1, 0])])
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.objects == before.objects + 2
    assert stats.stored_bytes == before.stored_bytes + 4 * 4096
    assert stats.fetch_streams_total == before.fetch_streams_total + 1
    assert stats.records_served == before.records_served + 2
    assert stats.bytes_served == before.bytes_served + 2 * 4096
    assert stats.bytes_read_from_disk == before.bytes_read_from_disk + 2 * 4096
    deleted = await stub.DeletePrefix(pb.DeletePrefixRequest(prefix_id="lst", layout="x"))
    assert (deleted.layouts_deleted, deleted.bytes_freed) == (1, 2 * 4096)
    await expect_status(grpc.StatusCode.NOT_FOUND, fetch(stub, [open_("lst", "x")]))
    assert (await stub.DeletePrefix(pb.DeletePrefixRequest(prefix_id="lst"))).layouts_deleted == 1
    assert (await stub.GetStats(pb.GetStatsRequest())).objects == before.objects


async def test_flipped_byte_on_disk_fails_only_that_request(
        stub: cache_pb2_grpc.CacheServiceStub, server: CacheProc) -> None:
    records = records_of([("a", 6, 5000)])
    await put(stub, put_requests("rot", "l", records))
    data_file = server.root / "objects" / "rot" / "l.data"
    with open(data_file, "r+b") as f:  # flip one bit in the last payload byte of record 1
        f.seek(8192 + 4999)
        last = f.read(1)
        f.seek(8192 + 4999)
        f.write(bytes([last[0] ^ 1]))
    before = await stub.GetStats(pb.GetStatsRequest())
    responses = await fetch(stub, [open_("rot", max_batch_bytes=5000), read(1, "a", [0, 2]),
                                   read(2, "a", [3, 1, 4]), read(3, "a", [5])])
    by_tag = {tag: [r for r in responses if r.tag == tag] for tag in (1, 2, 3)}
    assert b"".join(r.data for r in by_tag[1]) == records["a"][0] + records["a"][2]
    assert b"".join(r.data for r in by_tag[3]) == records["a"][5]
    failed = by_tag[2]  # record 3 arrives, then the request fails at record 1: no wrong bytes
    assert [list(r.indices) for r in failed] == [[3], []]
    assert failed[0].data == records["a"][3] and failed[0].error_code == 0
    assert failed[-1].done and failed[-1].error_code == grpc.StatusCode.DATA_LOSS.value[0]
    assert "record 1" in failed[-1].error_message and not failed[-1].data
    after = await stub.GetStats(pb.GetStatsRequest())
    assert after.checksum_failures == before.checksum_failures + 1
    assert after.fetch_requests_failed == before.fetch_requests_failed + 1


async def test_health_and_reflection(server: CacheProc) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "contiguouskv.v1.CacheService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=10)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        names = [s.name for r in [r async for r in call] for s in r.list_services_response.service]
        assert "contiguouskv.v1.CacheService" in names


def test_store_limit_and_sigterm(tmp_path: Path) -> None:
    proc = start_cache_server(tmp_path / "root", "--max-store-bytes", str(3 * 4096))

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("full", "a", records_of([("a", 2, 10)])))
            await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                put(stub, put_requests("full", "b", records_of([("a", 2, 10)]))),
                                "max_store_bytes")
            assert (await stub.GetStats(pb.GetStatsRequest())).objects == 1

    asyncio.run(scenario())
    assert "cache server listening on 127.0.0.1:" in proc.log()
    start = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0
    assert time.monotonic() - start < 10
    assert "cache server stopped" in proc.log()
    # what was committed survives a restart; the rejected object left nothing
    with start_cache_server(tmp_path / "root") as again:
        async def listed() -> list[str]:
            async with grpc.aio.insecure_channel(again.address) as channel:
                reply = await cache_pb2_grpc.CacheServiceStub(channel).ListPrefixes(
                    pb.ListPrefixesRequest(), timeout=10)
                return [f"{m.prefix_id}/{m.layout}" for m in reply.manifests]

        assert asyncio.run(listed()) == ["full/a"]


def test_cache_server_fixture_serves_and_stops(cache_server: CacheProc) -> None:
    with grpc.insecure_channel(cache_server.address) as channel:
        stats = cache_pb2_grpc.CacheServiceStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    assert stats.objects == 0
    assert cache_server.stop() == 0


async def test_client_disconnect_leaks_no_task_or_file(tmp_path: Path) -> None:
    # In-process server, so the test can look at its tasks and open files.
    from concurrent.futures import ThreadPoolExecutor

    from contiguouskv.cache_server.config import CacheServerConfig
    from contiguouskv.cache_server.service import CacheServicer, add_cache_service
    from contiguouskv.cache_server.store import RecordStore

    store = RecordStore(CacheServerConfig(root=tmp_path / "root"))
    server = grpc.aio.server()
    with ThreadPoolExecutor(2) as pool:
        add_cache_service(CacheServicer(store, pool, 4096), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = cache_pb2_grpc.CacheServiceStub(channel)
                await put(stub, put_requests("gone", "l", records_of([("a", 1000, 4096)]), chunk=250))
                for _ in range(3):
                    call = stub.Fetch(timeout=30)
                    await call.write(open_("gone"))
                    await call.write(read(1, "a", range(1000)))
                    assert (await call.read()).tag == 1
                    call.cancel()
                data_file = str(tmp_path / "root" / "objects" / "gone" / "l.data")
                for _ in range(100):
                    feeders = [t for t in asyncio.all_tasks() if "_feed" in repr(t.get_coro())]
                    open_files = [fd for fd in Path("/proc/self/fd").iterdir()
                                  if fd.is_symlink() and str(fd.readlink()) == data_file]
                    if not feeders and not open_files:
                        break
                    await asyncio.sleep(0.05)
                assert not feeders and not open_files
                stats = await stub.GetStats(pb.GetStatsRequest())
                assert stats.fetch_streams_total == 3 and stats.bytes_served < 1000 * 4096
                for _ in range(100):  # reads already running finish; then nothing is held
                    stats = await stub.GetStats(pb.GetStatsRequest())
                    if not (stats.inflight_streams or stats.inflight_bytes or stats.inflight_reads):
                        break
                    await asyncio.sleep(0.05)
                assert (stats.inflight_streams, stats.inflight_bytes, stats.inflight_reads) == (0, 0, 0)
        finally:
            await server.stop(None)


def test_sigterm_lets_an_open_stream_finish(cache_server: CacheProc) -> None:
    async def scenario() -> list[pb.FetchResponse]:
        async with grpc.aio.insecure_channel(cache_server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            records = records_of([("a", 300, 4096)])
            await put(stub, put_requests("drain", "l", records, chunk=100))
            call = stub.Fetch(timeout=30)
            await call.write(open_("drain", max_batch_bytes=4096))
            await call.write(read(1, "a", range(300)))
            first = await call.read()
            cache_server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            await call.done_writing()
            rest = await read_all(call)
            assert await call.code() == grpc.StatusCode.OK
            return [first, *rest]

    responses = asyncio.run(scenario())
    assert [i for r in responses for i in r.indices] == list(range(300))
    assert cache_server.proc.wait(20) == 0
