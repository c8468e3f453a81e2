"""Parallel Fetch streams per request (issue 17, item 3): :class:`MultiStream`.

Unit level, over in-process substreams (the fake shards of ``test_failover``, behind real
:class:`ReplicaStream` objects): a read goes whole to the least loaded substream and a cancel to the
one that owns the tag; closing ``responses()`` leaves no task running; a substream broken
mid-request fails over while the others start again where they were, and the loader still gets
every record exactly once. Through a real cache server: the merged stream of a real multi-stream
delivers what one stream does, and closing it leaves no task.

End to end with real processes (``random:tiny``): a compute server with ``--fetch-streams 4``
answers `full` and `contiguous` exactly as one with a single stream, and the cache server counts 4
Fetch streams for the request; with two shards and replication 2 the streams of one request spread
over both replicas, and SIGKILLing one of them mid-request (behind the forwarder of
``test_multinode``) still gives the same answer with no record fetched twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from contiguouskv import launch
from contiguouskv.client import NO_RETRY, ContiguousKVClient, ReprefillResult
from contiguouskv.common.fetch_wire import FetchBatch
from contiguouskv.common.placement import replica_set
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.cachenet.failover import ReplicaStream
from contiguouskv.compute_server.cachenet.multistream import MultiStream, rotated
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc
from test_failover import LAYOUT, FakeStream, Plan, expected, record, same_bits, size_of
from test_multinode import Forwarder

MODEL = "random:tiny"  # 4 layers, 2 KV heads x 16, float32: 4 KiB per 16-token kv record
LAYOUT_NAME = "contiguous-c16-g8"
COMPUTE_ARGS = ("--device", "cpu", "--dtype", "float32", "--threads", "1")
BIG_TOKENS = 4000  # 250 chunks x 4 layers x 4 KiB = 4 MB of kv records
FULL_BYTES = 4 * 250 * 4096


# --- unit level: substreams over in-process fake shards -------------------------------------------
class Lease:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


class LeasingStream(FakeStream):
    """A fake shard whose batches come with a shared-memory lease, as on the shared-memory plane."""

    leases: list[Lease]

    async def responses(self) -> AsyncIterator[FetchBatch]:
        async for batch in super().responses():
            batch.lease = Lease()
            self.leases.append(batch.lease)
            yield batch


async def open_fakes(plans: dict[str, Plan], count: int,
                     leases: list[Lease] | None = None) -> tuple[MultiStream, list[FakeStream]]:
    """A MultiStream of ``count`` substreams over the fake shards ``plans`` (in read order);
    with ``leases``, their batches carry leases, collected there."""
    made: list[FakeStream] = []

    async def connect(address: str) -> FakeStream:
        if plans[address].refuse:
            raise ComputeError(f"cache server {address}: connection refused", code="UNAVAILABLE")
        if leases is None:
            made.append(FakeStream(address, plans[address]))
        else:
            made.append(LeasingStream(address, plans[address]))
            made[-1].leases = leases  # type: ignore[attr-defined]
        return made[-1]

    return await MultiStream.open("p" * 32, LAYOUT.name, list(plans), connect, count), made  # type: ignore[arg-type]


def others(current: asyncio.Task[object] | None) -> set[asyncio.Task[object]]:
    """Tasks of the running loop not done, but the current one."""
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_rotated_orders_spread_the_replicas() -> None:
    assert [rotated(["a", "b"], k) for k in range(4)] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert [rotated(["a"], k) for k in range(3)] == [["a"]] * 3
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_reads_go_whole_to_the_least_loaded_substream_and_cancels_to_their_owner() -> None:
    async def main() -> None:
        plans = {"a": Plan(), "b": Plan()}
        multi, fakes = await open_fakes(plans, 2)
        assert [s.address for s in multi.streams] == ["a", "b"] and multi.address == "a,b"
        await multi.read(1, "kv/0", [0, 1, 2, 3])  # -> a (tie: the first)
        await multi.read(2, "kv/0", [4, 5, 6])  # -> b (a holds 4 records)
        await multi.read(3, "kv/0", [7])  # -> b (3 < 4)
        await multi.read(4, "kv/0", [8, 9])  # -> a (4 and 4: the first)
        assert [t for t, _ in plans["a"].asked] == [1, 4] and [t for t, _ in plans["b"].asked] == [2, 3]
        await multi.cancel([3, 4])
        assert fakes[0]._cancelled == {4} and fakes[1]._cancelled == {3}
        got: dict[int, list[FetchBatch]] = {}
        async with contextlib.aclosing(multi.responses()) as batches:
            async for batch in batches:
                got.setdefault(batch.tag, []).append(batch)
                if all(t in got and got[t][-1].done for t in (1, 2, 3, 4)):
                    break
        assert [i for b in got[1] for i in b.indices] == [0, 1, 2, 3]  # in order, on one substream
        assert [i for b in got[2] for i in b.indices] == [4, 5, 6]
        assert got[3][-1].cancelled and got[4][-1].cancelled
        await multi.cancel([1, 2])  # done: nothing of them left to cancel, nothing sent
        assert fakes[0]._cancelled == {4} and fakes[1]._cancelled == {3}
        await multi.read(5, "kv/0", [10])  # every read done: the load is back to 0 on both -> a
        assert [t for t, _ in plans["a"].asked][-1] == 5
        await multi.close()
        assert all(f.closed for f in fakes)

    asyncio.run(main())


@pytest.mark.parametrize("consumed", [0, 1, 5])
def test_closing_responses_leaves_no_task_running(consumed: int) -> None:
    """Closed while every drain waits on its shard (nothing asked), or with batches queued and
    drains blocked on the full queue."""
    async def main() -> None:
        multi, _ = await open_fakes({"a": Plan(), "b": Plan(), "c": Plan()}, 3)
        me = asyncio.current_task()
        before = others(me)
        if consumed:
            for tag in range(1, 7):
                await multi.read(tag, "kv/0", list(range(30)))  # 10 messages each
        batches = multi.responses()
        if consumed:
            for _ in range(consumed):
                assert (await anext(batches)).indices
        else:
            waiting = asyncio.create_task(anext(batches))  # type: ignore[arg-type]
            await settle()
            assert len(others(me) - before) == 1 + 3  # the consumer and one drain per substream
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        await batches.aclose()  # type: ignore[attr-defined]
        await settle()
        assert others(me) == before
        await multi.close()

    asyncio.run(main())


def test_batches_dropped_at_close_give_their_shared_memory_back() -> None:
    async def main() -> None:
        leases: list[Lease] = []
        multi, _ = await open_fakes({"a": Plan(), "b": Plan()}, 2, leases)
        for tag in range(1, 5):
            await multi.read(tag, "kv/0", list(range(30)))
        async with contextlib.aclosing(multi.responses()) as batches:
            for _ in range(3):
                batch = await anext(batches)
                assert batch.lease is not None
                batch.lease.release()  # what the loader does with records it used
            await settle()  # the drains have filled the queue and hold one more batch each
        assert len(leases) > 3 and [lease.released for lease in leases] == [1] * len(leases)
        await multi.close()

    asyncio.run(main())


def test_a_substream_error_is_raised_after_its_batches_and_stops_the_others() -> None:
    async def main() -> None:
        plans = {"a": Plan(break_after=2), "b": Plan()}
        multi, _ = await open_fakes(plans, 2)
        me = asyncio.current_task()
        await multi.read(1, "kv/0", list(range(30)))  # -> a, breaks after 2 messages
        await multi.read(2, "kv/0", list(range(3)))  # -> b
        seen = []
        with pytest.raises(ComputeError, match="a: Socket closed"):
            async with contextlib.aclosing(multi.responses()) as batches:
                async for batch in batches:
                    seen.append((batch.tag, len(batch.indices)))
        assert seen.count((1, 3)) == 2 and (2, 3) in seen
        await settle()
        assert others(me) == set()
        assert multi.can_fail_over(ComputeError("x", code="UNAVAILABLE"))
        assert not multi.can_fail_over(ComputeError("x", code="INVALID_ARGUMENT"))
        await multi.close()

    asyncio.run(main())


async def load_all(stream: MultiStream | ReplicaStream) -> KVLoader:
    """Every kv record (layers 0-1 in one read per region, 2-3 one read per chunk) and the tokens,
    checked bit for bit, through a KVLoader on ``stream``."""
    loop = asyncio.get_running_loop()
    loader = KVLoader(ContiguousCodec(LAYOUT), stream, loop)  # type: ignore[arg-type]
    io = asyncio.create_task(loader.run())
    chunks = list(range(LAYOUT.num_chunks))
    try:
        loader.start_load(chunks, range(0, 2))
        tokens = loader.start_blob("tokens", [0])
        loader.start_load_per_unit(chunks, range(2, 4))
        for layer in range(4):
            keys, values, _ = await loop.run_in_executor(None, loader.wait_for_layer, layer, chunks)
            ref_k, ref_v = expected(layer, chunks)
            assert same_bits(keys, ref_k) and same_bits(values, ref_v), layer
        got, _ = await loop.run_in_executor(None, loader.wait_blob, tokens)
        assert b"".join(bytes(p) for p in got) == record("tokens", 0, size_of("tokens"))
    finally:
        io.cancel()
        await asyncio.gather(io, return_exceptions=True)
        await stream.close()
    return loader


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("break_after", [0, 2, 5])
def test_a_broken_substream_fails_over_and_every_record_arrives_once(count: int, break_after: int) -> None:
    async def main() -> None:
        plans = {"a": Plan(break_after=break_after), "b": Plan()}
        multi, fakes = await open_fakes(plans, count)
        loader = await load_all(multi)
        assert loader.kv_records_received == LAYOUT.num_chunks * 4  # none twice, none lost
        assert [f.address for f in fakes[:count]] == [rotated(["a", "b"], k)[0] for k in range(count)]
        assert loader.failovers and loader.failovers[0].startswith("a,b -> ")
        # every call was ended at each fail-over: the first one moved to b, the others opened again
        assert len(fakes) >= 2 * count and all(f.closed for f in fakes)
        assert "b" in multi.address

    asyncio.run(main())


def test_the_broken_substream_without_a_replica_left_ends_the_request() -> None:
    async def main() -> None:
        plans = {"a": Plan(break_after=2)}
        multi, _ = await open_fakes(plans, 3)  # one replica: every substream on it
        with pytest.raises(ComputeError, match="Socket closed") as info:
            await load_all(multi)
        assert info.value.code == "UNAVAILABLE"

    asyncio.run(main())


def test_an_in_band_failure_moves_only_its_substream() -> None:
    async def main() -> None:
        plans = {"a": Plan(fail_tag=2), "b": Plan()}  # tag 2: the tokens blob
        multi, _ = await open_fakes(plans, 2)
        loader = await load_all(multi)
        assert loader.kv_records_received == LAYOUT.num_chunks * 4
        assert 2 in [tag for tag, _ in plans["b"].asked]

    asyncio.run(main())


# --- real processes ---------------------------------------------------------------------------------
def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def _same(a: ReprefillResult, b: ReprefillResult) -> None:
    assert (a.token_id, a.generated_ids) == (b.token_id, b.generated_ids)
    la, lb = torch.tensor(a.logits), torch.tensor(b.logits)
    assert la.shape == lb.shape and la.numel() > 0
    assert float((la - lb).abs().max()) <= 1e-5 * float(la.abs().max())


def _stats(address: str) -> cache_pb2.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return cache_pb2_grpc.CacheServiceStub(channel).GetStats(cache_pb2.GetStatsRequest(), timeout=10)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[launch.ServiceProcess, dict[int, str]]]:
    """One cache server and two compute servers on it: 1 and 4 Fetch streams per request."""
    tmp = tmp_path_factory.mktemp("multistream")
    cache = launch.cache_server(tmp / "store")
    computes: dict[int, launch.ServiceProcess] = {}
    try:
        cache.wait_ready()
        computes = {n: launch.compute_server(MODEL, cache.address, *COMPUTE_ARGS, "--fetch-streams", str(n),
                                             log_path=tmp / f"compute-{n}.log") for n in (1, 4)}
        yield cache, {n: p.wait_ready() for n, p in computes.items()}
    finally:
        for proc in computes.values():
            proc.stop()
        cache.stop()


@pytest.mark.parametrize("policy,budget,period", [("full", 1.0, None), ("contiguous", 0.5, None),
                                                  ("contiguous", 0.5, 1)])
def test_four_streams_answer_as_one(one_shard: tuple[launch.ServiceProcess, dict[int, str]], policy: str,
                                    budget: float, period: int | None) -> None:
    cache, computes = one_shard
    with ContiguousKVClient(computes[1], timeout=120) as one, ContiguousKVClient(computes[4], timeout=120) as four:
        pid = one.register(token_ids=_ids(1000, seed=3)).prefix_id
        query = _ids(9, seed=4)
        kwargs = dict(policy=policy, budget=budget, period=period, sub_period=1 if period else None,
                      max_new_tokens=3, return_logits=True)
        want = one.reprefill(pid, query, **kwargs)  # type: ignore[arg-type]
        opened = _stats(cache.address).fetch_streams_total
        got = four.reprefill(pid, query, **kwargs)  # type: ignore[arg-type]
        assert _stats(cache.address).fetch_streams_total - opened == 4  # one request, four Fetch streams
        assert got.logits == want.logits and (got.token_id, got.generated_ids) == (want.token_id, want.generated_ids)
        if policy == "full":  # contiguous cancels predictions: how much of them arrived first varies
            assert got.bytes_fetched == want.bytes_fetched
        opened = _stats(cache.address).fetch_streams_total
        one.reprefill(pid, query, **kwargs)  # type: ignore[arg-type]
        assert _stats(cache.address).fetch_streams_total - opened == 1


def test_a_real_multistream_merges_every_record_and_leaves_no_task(
        one_shard: tuple[launch.ServiceProcess, dict[int, str]]) -> None:
    cache, computes = one_shard
    with ContiguousKVClient(computes[1], timeout=120) as client:
        pid = client.register(token_ids=_ids(700, seed=5)).prefix_id

    async def read_all(streams: int, tags: dict[int, list[int]], region: str,
                       stop_after: int | None = None) -> dict[int, bytes]:
        cache_client = CacheClient([cache.address], 64 << 20, 30.0)
        me = asyncio.current_task()
        try:
            stream = await cache_client.open_stream(pid, LAYOUT_NAME, 64 << 10, streams)
            assert isinstance(stream, MultiStream if streams > 1 else ReplicaStream)
            before = others(me)
            for tag, indices in tags.items():
                await stream.read(tag, region, indices)
            data: dict[int, bytearray] = {tag: bytearray() for tag in tags}
            done: set[int] = set()
            seen = 0
            batches: AsyncIterator[FetchBatch] = stream.responses()
            async with contextlib.aclosing(batches):  # type: ignore[type-var]
                async for batch in batches:
                    assert not batch.error_code, batch.error_message
                    data[batch.tag] += batch.data
                    done |= {batch.tag} if batch.done else set()
                    seen += 1
                    if done == set(tags) or seen == stop_after:
                        break
            await settle()
            assert not others(me) - before  # the drains are gone
            await stream.close()
            return {tag: bytes(b) for tag, b in data.items()}
        finally:
            await cache_client.close()

    async def main() -> None:
        manifest = await _manifest(cache.address, pid)
        region = next(r for r in manifest.regions if r.name.startswith("kv/"))
        n = region.num_records
        tags = {tag: list(range(tag - 1, n, 5)) for tag in range(1, 6)}
        single = await read_all(1, tags, region.name)
        assert sum(len(b) for b in single.values()) == n * region.record_size
        assert await read_all(3, tags, region.name) == single
        await read_all(3, tags, region.name, stop_after=2)  # closed mid-way: no task left either

    asyncio.run(main())


async def _manifest(address: str, pid: str) -> cache_pb2.Manifest:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await cache_pb2_grpc.CacheServiceStub(channel).GetManifest(
            cache_pb2.GetManifestRequest(prefix_id=pid, layout=LAYOUT_NAME), timeout=10)
    return reply.manifest


def test_streams_spread_over_two_replicas_and_survive_a_killed_shard(tmp_path: Path) -> None:
    shards = [launch.cache_server(tmp_path / f"store-{i}") for i in range(2)]
    forwarders: list[Forwarder] = []
    compute: launch.ServiceProcess | None = None
    try:
        forwarders = [Forwarder(s.wait_ready()) for s in shards]
        addresses = [f.address for f in forwarders]
        compute = launch.compute_server(MODEL, ",".join(addresses), *COMPUTE_ARGS, "--replication", "2",
                                        "--fetch-streams", "2", log_path=tmp_path / "compute.log")
        with ContiguousKVClient(compute.wait_ready(), timeout=120, retry=NO_RETRY) as client:
            pid = client.register(token_ids=_ids(BIG_TOKENS, seed=7)).prefix_id
            assert sorted(replica_set(pid, addresses, 2)) == sorted(addresses)
            query = _ids(8, seed=8)
            opened = [_stats(s.address).fetch_streams_total for s in shards]
            sent = [f.forwarded for f in forwarders]
            # full, one read per layer (a tiny model has one sub-period: one read, on one stream)
            full = dict(policy="full", period=1, sub_period=1, return_logits=True)
            before = client.reprefill(pid, query, **full)  # type: ignore[arg-type]
            assert before.bytes_fetched == FULL_BYTES
            # one stream on each replica, each carrying a good part of the records
            assert [_stats(s.address).fetch_streams_total - o for s, o in zip(shards, opened)] == [1, 1]
            share = [f.forwarded - s for f, s in zip(forwarders, sent)]
            assert all(b > FULL_BYTES // 4 for b in share), share

            # SIGKILL the first replica 1 MiB into its part of the next request
            first = replica_set(pid, addresses, 2)[0]
            victim = addresses.index(first)
            forwarders[victim].arm(1 << 20, shards[victim].proc.kill)
            during = client.reprefill(pid, query, **full)  # type: ignore[arg-type]
            assert forwarders[victim].tripped.is_set()
            shards[victim].proc.wait(10)
            _same(before, during)
            assert during.bytes_fetched == FULL_BYTES  # records already received were not fetched again
            log = (tmp_path / "compute.log").read_text()
            assert re.search(rf"fetch stream from [0-9.:,]*{re.escape(first)}[0-9.:,]* broke", log), log[-3000:]
            # with one replica dead, both streams read the other one
            _same(before, client.reprefill(pid, query, **full))  # type: ignore[arg-type]
    finally:
        if compute is not None:
            compute.stop()
        for shard in shards:
            shard.stop()
        for forwarder in forwarders:
            forwarder.close()
