"""KVLoader over a ReplicaStream: a stream that breaks mid-request continues on the next replica.

In-process fakes of the cache shards (no server): each serves deterministic record bytes for any
(region, index), a few records per message, and can break after a given number of messages, fail a
read in-band, or refuse the connection. The loader must deliver every record exactly once, in the
right (layer, chunk) slot, re-asking the next replica only for what had not arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from contiguouskv.common.fetch_wire import FetchBatch
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.cachenet.failover import ReplicaStream
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec, unpack_kv_record

LAYOUT = ContiguousLayout(200, 4, 2, 8, "float32", chunk_size=16, group_size=2)  # 13 chunks, 2 groups
PER_MESSAGE = 3


def record(region: str, index: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{region}/{index}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def size_of(region: str) -> int:
    return LAYOUT.kv_record_size if region.startswith("kv/") else 4 * LAYOUT.num_tokens


@dataclass
class Plan:
    """How one fake shard behaves."""

    break_after: int | None = None  # messages, then the stream fails with UNAVAILABLE
    refuse: bool = False  # connect fails
    fail_tag: int | None = None  # this read fails in-band with DATA_LOSS
    stream_code: str = "UNAVAILABLE"
    asked: list[tuple[int, list[int]]] = field(default_factory=list)  # (tag, indices) of every read received
    sent: int = 0  # records delivered
    messages: int = 0  # read messages received (several reads may come in one)
    break_on_write: bool = False  # the first message of several reads breaks the stream after its first read


class FakeStream:
    def __init__(self, address: str, plan: Plan) -> None:
        self.address = address
        self.plan = plan
        self._queue: list[tuple[int, str, list[int]]] = []
        self._cancelled: set[int] = set()
        self._wake = asyncio.Event()
        self._broken = False
        self.closed = False

    async def read(self, tag: int, region: str, indices: Sequence[int], priority: int = 0) -> None:
        self.plan.messages += 1
        self._queue_read(tag, region, indices)

    def _queue_read(self, tag: int, region: str, indices: Sequence[int]) -> None:
        self.plan.asked.append((tag, list(indices)))
        self._queue.append((tag, region, list(indices)))
        self._wake.set()

    async def read_many(self, reads: Sequence[tuple[int, str, Sequence[int], int]]) -> None:
        self.plan.messages += 1
        if self.plan.break_on_write and not self._broken and len(reads) > 1:
            self._broken = True
            self._queue_read(*reads[0][:3])
            raise ComputeError(f"cache server {self.address}: Socket closed", code="UNAVAILABLE")
        for tag, region, indices, _ in reads:
            self._queue_read(tag, region, indices)

    async def cancel(self, tags: Sequence[int]) -> None:
        self._cancelled.update(tags)
        self._wake.set()

    async def responses(self) -> AsyncIterator[FetchBatch]:
        messages = 0
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self._broken:
                raise ComputeError(f"cache server {self.address}: Socket closed", code="UNAVAILABLE")
            tag, region, indices = self._queue.pop(0)
            if tag in self._cancelled:
                yield FetchBatch(tag, region, [], memoryview(b""), True, True, 0, "")
                continue
            if tag == self.plan.fail_tag:
                yield FetchBatch(tag, region, [], memoryview(b""), True, False, 15, "checksum mismatch")
                continue
            for start in range(0, len(indices), PER_MESSAGE):
                if self.plan.break_after is not None and messages >= self.plan.break_after:
                    raise ComputeError(f"cache server {self.address}: Socket closed", code=self.plan.stream_code)
                part = indices[start : start + PER_MESSAGE]
                data = b"".join(record(region, i, size_of(region)) for i in part)
                messages += 1
                self.plan.sent += len(part)
                yield FetchBatch(tag, region, part, memoryview(data), start + PER_MESSAGE >= len(indices), False, 0, "")
                await asyncio.sleep(0)

    async def close(self) -> None:
        self.closed = True


def replica_stream(plans: dict[str, Plan]) -> ReplicaStream:
    async def connect(address: str) -> FakeStream:
        if plans[address].refuse:
            raise ComputeError(f"cache server {address}: connection refused", code="UNAVAILABLE")
        return FakeStream(address, plans[address])

    return ReplicaStream("p" * 32, LAYOUT.name, list(plans), connect)  # type: ignore[arg-type]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal (the fake records are arbitrary bytes: NaNs included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def expected(layer: int, chunks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = []
    for chunk in chunks:
        region, index = LAYOUT.kv_record(chunk, layer)
        parts.append(unpack_kv_record(LAYOUT, record(region, index, LAYOUT.kv_record_size)))
    keys = torch.cat([k for k, _ in parts], dim=1)[:, : LAYOUT.tokens_in(chunks)]
    values = torch.cat([v for _, v in parts], dim=1)[:, : LAYOUT.tokens_in(chunks)]
    return keys, values


@contextlib.asynccontextmanager
async def running_loader(plans: dict[str, Plan], staged: bool) -> AsyncIterator[KVLoader]:
    """A loader over a replica stream of ``plans``, its pump running (with a stager thread when ``staged``)."""
    loop = asyncio.get_running_loop()
    stream = replica_stream(plans)
    await stream.start()
    stager = ThreadPoolExecutor(1) if staged else None
    loader = KVLoader(ContiguousCodec(LAYOUT), stream, loop, stager=stager)  # type: ignore[arg-type]
    io = asyncio.create_task(loader.run())
    try:
        yield loader
    finally:
        io.cancel()
        await asyncio.gather(io, return_exceptions=True)
        await stream.close()
        if stager is not None:
            stager.shutdown()


async def load_everything(plans: dict[str, Plan], cancel_last: bool = False, staged: bool = False) -> KVLoader:
    """Ask for every kv record (layers 0-1 in one read, 2-3 one read per chunk) and the tokens.

    ``staged``: layers 0-1 are announced (:meth:`KVLoader.expect`) and assembled by a stager thread.
    """
    loop = asyncio.get_running_loop()
    chunks = list(range(LAYOUT.num_chunks))
    async with running_loader(plans, staged) as loader:
        if staged:
            loader.expect(range(0, 2), chunks)
        loader.start_load(chunks, range(0, 2))
        tokens = loader.start_blob("tokens", [0])
        per_chunk = loader.start_load_per_unit(chunks, range(2, 4))
        if cancel_last:
            loader.cancel(per_chunk[chunks[-1]])
        wanted = chunks[:-1] if cancel_last else chunks
        for layer in range(4):
            want = chunks if layer < 2 else wanted
            keys, values, _ = await loop.run_in_executor(None, loader.wait_for_layer, layer, want)
            ref_k, ref_v = expected(layer, want)
            assert same_bits(keys, ref_k) and same_bits(values, ref_v), layer
        got, _ = await loop.run_in_executor(None, loader.wait_blob, tokens)
        assert b"".join(bytes(p) for p in got) == record("tokens", 0, size_of("tokens"))
    if staged:
        assert set(loader._staged) == {0, 1}  # layers 0-1 went through the stager
    return loader


def test_no_failure_reads_the_first_replica_only() -> None:
    plans = {"a": Plan(), "b": Plan()}
    loader = asyncio.run(load_everything(plans))
    assert loader.failovers == [] and plans["b"].asked == []
    assert loader.kv_records_received == LAYOUT.num_chunks * 4
    # the reads started together (per region, then one per chunk) went out in one message
    assert len(plans["a"].asked) > LAYOUT.num_chunks and plans["a"].messages == 1


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("break_after", [0, 1, 5, 12])
def test_a_stream_broken_mid_request_continues_on_the_next_replica(break_after: int, staged: bool) -> None:
    plans = {"a": Plan(break_after=break_after), "b": Plan()}
    loader = asyncio.run(load_everything(plans, staged=staged))
    assert loader.failovers == ["a -> b"]
    total = LAYOUT.num_chunks * 4 + 1  # kv records and the tokens record
    # every record exactly once: b was asked only for what a had not delivered
    assert plans["a"].sent + plans["b"].sent == total
    assert sum(len(i) for _, i in plans["b"].asked) == total - plans["a"].sent
    assert loader.kv_records_received == LAYOUT.num_chunks * 4


@pytest.mark.parametrize("cancel_last", [False, True])
def test_a_stream_broken_while_sending_reads_sends_all_of_them_to_the_next_replica(cancel_last: bool) -> None:
    plans = {"a": Plan(break_on_write=True), "b": Plan()}
    loader = asyncio.run(load_everything(plans, cancel_last=cancel_last))  # checks every record's bytes
    assert loader.failovers == ["a -> b"] and plans["a"].sent == 0


def test_failover_skips_a_refusing_replica_and_survives_two_breaks() -> None:
    plans = {"a": Plan(break_after=4), "b": Plan(refuse=True), "c": Plan(break_after=3), "d": Plan()}
    loader = asyncio.run(load_everything(plans))
    assert loader.failovers == ["a -> c", "c -> d"]
    assert plans["a"].sent + plans["c"].sent + plans["d"].sent == LAYOUT.num_chunks * 4 + 1


def test_cancelled_reads_are_not_sent_again() -> None:
    plans = {"a": Plan(break_after=6), "b": Plan()}
    loader = asyncio.run(load_everything(plans, cancel_last=True))
    assert loader.failovers == ["a -> b"]
    cancelled_tag = max(tag for tag, _ in plans["a"].asked)
    assert cancelled_tag not in [tag for tag, _ in plans["b"].asked]


def test_an_in_band_read_failure_moves_to_the_next_replica() -> None:
    plans = {"a": Plan(fail_tag=2), "b": Plan()}  # tag 2: the tokens blob
    loader = asyncio.run(load_everything(plans))
    assert loader.failovers == ["a -> b"]
    assert 2 in [tag for tag, _ in plans["b"].asked]


def test_every_replica_failing_names_them_all() -> None:
    plans = {"a": Plan(break_after=2), "b": Plan(break_after=1)}
    with pytest.raises(ComputeError) as info:
        asyncio.run(load_everything(plans))
    assert "a: " in str(info.value) and "b: " in str(info.value) and info.value.code == "UNAVAILABLE"


def test_a_request_error_does_not_fail_over() -> None:
    plans = {"a": Plan(break_after=2, stream_code="INVALID_ARGUMENT"), "b": Plan()}
    with pytest.raises(ComputeError) as info:
        asyncio.run(load_everything(plans))
    assert info.value.code == "INVALID_ARGUMENT" and plans["b"].asked == []


@pytest.mark.parametrize("staged", [False, True])
def test_gather_buffers_are_reused_only_once_the_layer_is_consumed(staged: bool) -> None:
    """A layer's K/V stay intact until the engine says it consumed them; then a later layer is
    gathered into the same memory (on the compute thread's path; the stager may run ahead)."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        chunks = list(range(LAYOUT.num_chunks))
        async with running_loader({"a": Plan()}, staged) as loader:
            if staged:
                loader.expect(range(4), chunks)
            loader.start_load(chunks, range(4))
            kept, storage = [], []
            for layer in range(4):
                keys, values, _ = await loop.run_in_executor(None, loader.wait_for_layer, layer, chunks)
                ref_k, ref_v = expected(layer, chunks)
                assert same_bits(keys, ref_k) and same_bits(values, ref_v), layer
                storage.append(keys.untyped_storage().data_ptr())
                if layer < 2:
                    kept.append((layer, keys, values))  # not consumed: nobody may write them
                else:
                    loader.consumed(layer)
            for layer, keys, values in kept:
                ref_k, ref_v = expected(layer, chunks)
                assert same_bits(keys, ref_k) and same_bits(values, ref_v), layer
            assert len(set(storage[:2])) == 2 and not set(storage[:2]) & set(storage[2:])
            if not staged:  # gathered when waited for: layer 3 into layer 2's consumed buffers
                assert storage[3] == storage[2]

    asyncio.run(go())
