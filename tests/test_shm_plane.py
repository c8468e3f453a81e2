"""The shared-memory data plane: real cache servers with ``--shm-socket``, real memfds, real streams.

End to end, a compute core reading through the plane answers exactly as over gRPC bytes and the
records really travel through shared memory; the slot ledger (pure, in-process) never lends a slot
twice; a bad descriptor or control message gets a clear error and nothing is served wrong; only the
server's own user can open a plane; and SIGKILL of either side leaks no shared memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from contiguouskv import launch
from contiguouskv.cache_server.shm_plane import Plane
from contiguouskv.cache_server.stats import Counters
from contiguouskv.common import shm_protocol as proto
from contiguouskv.common.checksum import crc32_any_size
from contiguouskv.common.fetch_wire import FetchBatch, ShmRef
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.cachenet.shm_plane import PlaneError, ShmPlane
from contiguouskv.compute_server.config import ComputeServerConfig, default_cache_dir
from contiguouskv.compute_server.core import ComputeCore
from contiguouskv.compute_server.model.loading import LoadedModel, load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.request import ReprefillArgs, ReprefillReport
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc

MODEL = "random:tiny"
POLICIES = ("full", "contiguous", "contiguous+", "h2o", "impress")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def socket_path(workdir: Path) -> str:
    return str(workdir / "run" / "plane.sock")


@pytest.fixture(scope="module")
def cache(workdir: Path, socket_path: str) -> Iterator[launch.ServiceProcess]:
    with launch.cache_server(workdir / "store", "--shm-socket", socket_path) as proc:
        yield proc


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(MODEL, cache_dir=default_cache_dir())


def _stats(address: str) -> cache_pb2.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return cache_pb2_grpc.CacheServiceStub(channel).GetStats(cache_pb2.GetStatsRequest(), timeout=10)


def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _plane_mappings(pid: int | str = "self") -> int:
    return Path(f"/proc/{pid}/maps").read_text().count("ckv-shm-plane")


def _answers(model: LoadedModel, address: str, data_path: str, socket_path: str, prefix: list[int],
             slots: int = 8) -> tuple[list[ReprefillReport], tuple[str, str]]:
    """Every policy at budgets 1.0 and 0.3, and the prefix's (id, primary layout)."""
    async def main() -> tuple[list[ReprefillReport], tuple[str, str]]:
        config = ComputeServerConfig(model=MODEL, cache=(address,), device="cpu", dtype="float32")
        client = CacheClient(config.cache, config.max_message_bytes, 60.0, data_path=data_path,
                             shm_socket=socket_path, shm_slots=slots, shm_slot_bytes=64 << 10)
        core = ComputeCore(config, model, ModelRunner(model), client)
        try:
            reg = await core.register(prefix, ["impress"])
            out = [await core.reprefill(ReprefillArgs(reg.prefix_id, [5, 6, 7], p, b, max_new_tokens=2,
                                                      return_logits=True))
                   for p in POLICIES for b in (1.0, 0.3)]
            return out, (reg.prefix_id, core.layout_name)
        finally:
            await asyncio.gather(*core._reports, return_exceptions=True)
            core.close()
            await client.close()

    return asyncio.run(main())


# --- end to end ----------------------------------------------------------------------------------
def test_every_policy_answers_through_shared_memory_exactly_as_over_grpc(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    prefix = [random.Random(3).randrange(512) for _ in range(300)]
    over_grpc, _ = _answers(model, cache.address, "grpc", socket_path, prefix)
    before = _stats(cache.address)
    through_shm, _ = _answers(model, cache.address, "shm", socket_path, prefix)
    after = _stats(cache.address)
    for policy_budget, a, b in zip([(p, b) for p in POLICIES for b in (1.0, 0.3)], over_grpc, through_shm):
        assert (a.token_id, a.outcome.generated_ids) == (b.token_id, b.outcome.generated_ids), policy_budget
        assert a.outcome.logits is not None and b.outcome.logits is not None
        assert a.outcome.logits.tolist() == b.outcome.logits.tolist(), policy_budget  # the same bytes
        if policy_budget[0] == "full":  # the others cancel predictions: what arrives first varies
            assert a.bytes_fetched == b.bytes_fetched, policy_budget
        # each answer says how its bytes came: none through shared memory over gRPC
        assert a.bytes_fetched_shm == 0 and 0 <= b.bytes_fetched_shm <= b.bytes_fetched, policy_budget
    served = after.bytes_served - before.bytes_served
    via_shm = after.bytes_served_shm - before.bytes_served_shm
    assert served > 0 and via_shm > 0.5 * served  # most records really came through shared memory
    # the answers' own counts: most of what the cache server placed there (not records that arrived
    # after their request was cancelled or over)
    assert 0.5 * via_shm < sum(b.bytes_fetched_shm for b in through_shm) <= via_shm
    _wait_for(lambda: _stats(cache.address).shm_planes == 0)  # the client closed: plane gone, slots free
    assert _stats(cache.address).shm_slots_lent == 0


def test_auto_falls_back_to_grpc_bytes_when_no_plane_can_be_opened(
        cache: launch.ServiceProcess, model: LoadedModel, workdir: Path) -> None:
    prefix = [random.Random(4).randrange(512) for _ in range(200)]
    before = _stats(cache.address)
    answers, _ = _answers(model, cache.address, "auto", str(workdir / "nobody-listens.sock"), prefix)
    after = _stats(cache.address)
    assert all(a.token_id >= 0 and a.bytes_fetched_shm == 0 for a in answers)
    assert after.bytes_served > before.bytes_served and after.bytes_served_shm == before.bytes_served_shm


def test_shm_required_without_a_server_is_unavailable(cache: launch.ServiceProcess, workdir: Path) -> None:
    async def main() -> None:
        client = CacheClient((cache.address,), 64 << 20, 10.0, data_path="shm",
                             shm_socket=str(workdir / "nobody-listens.sock"))
        try:
            await client.open_stream_at(cache.address, "0" * 32, "contiguous", 1 << 20)
        finally:
            await client.close()

    with pytest.raises(Exception, match="shared-memory plane .*nobody-listens.sock") as info:
        asyncio.run(main())
    assert getattr(info.value, "code", "") == "UNAVAILABLE"


# --- DRAM hits in place --------------------------------------------------------------------------
SCATTERED = [0, 1, 2, 5, 6, 9]


def _read_records(address: str, socket_path: str, prefix_id: str, layout: str, data_path: str,
                  then=None) -> tuple[list[FetchBatch], dict]:  # type: ignore[no-untyped-def]
    """The batches of one read of ``SCATTERED`` in ``kv/G0`` (with their data copied) on ``data_path``;
    ``then(client, batches)`` runs while the shared-memory ones are still held, before they are released."""
    async def main() -> tuple[list[FetchBatch], dict]:
        client = CacheClient((address,), 64 << 20, 30.0, data_path=data_path, shm_socket=socket_path,
                             shm_slots=4, shm_slot_bytes=64 << 10)
        try:
            stream = await client.open_stream_at(address, prefix_id, layout, 64 << 10)
            await stream.read(1, "kv/G0", SCATTERED)
            batches = []
            async for batch in stream.responses():
                batches.append(batch)
                if batch.done:
                    break
            seen = {"readonly": all(b.data.readonly for b in batches),
                    "arenas": client.plane.arenas if client.plane is not None else 0}
            if then is not None:
                seen.update(await then(client, batches))
            copies = [dataclasses.replace(b, data=memoryview(bytes(b.data)), lease=None) for b in batches]
            for batch in batches:
                if batch.lease is not None:
                    batch.lease.release()
            await stream.close()
            return copies, seen
        finally:
            await client.close()

    return asyncio.run(main())


def _by_index(batches: list[FetchBatch]) -> dict[int, bytes]:
    out = {}
    for batch in batches:
        size = len(batch.data) // len(batch.indices)
        for k, index in enumerate(batch.indices):
            out[index] = bytes(batch.data[k * size : (k + 1) * size])
    return out


def test_dram_hits_are_read_in_place_from_the_server_s_arena_with_the_bytes_of_the_grpc_path(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    _, (prefix_id, layout) = _answers(model, cache.address, "grpc", socket_path, [11] * 170)  # now in DRAM
    over_grpc, _ = _read_records(cache.address, socket_path, prefix_id, layout, "grpc")
    before = _stats(cache.address)
    in_place, seen = _read_records(cache.address, socket_path, prefix_id, layout, "shm")
    after = _stats(cache.address)
    assert _by_index(in_place) == _by_index(over_grpc) and sorted(_by_index(in_place)) == SCATTERED
    # one batch per run of records adjacent in the arena; only the last says done
    assert [b.done for b in in_place] == [False] * (len(in_place) - 1) + [True]
    assert [i for b in in_place for i in b.indices] == SCATTERED
    assert seen["readonly"] and seen["arenas"] == 1  # mapped read-only by the client
    served = after.bytes_served_in_place - before.bytes_served_in_place
    assert served == sum(len(b.data) for b in in_place) > 0
    assert after.bytes_served_shm - before.bytes_served_shm == served  # no slot was used
    assert after.bytes_read_from_disk == before.bytes_read_from_disk
    _wait_for(lambda: _stats(cache.address).shm_leases == 0)  # every lease came back


def test_a_prefix_deleted_while_its_records_are_leased_keeps_their_bytes_until_released(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    _, (prefix_id, layout) = _answers(model, cache.address, "grpc", socket_path, [13] * 170)
    expected = _by_index(_read_records(cache.address, socket_path, prefix_id, layout, "grpc")[0])

    async def delete_while_held(client: CacheClient, batches: list[FetchBatch]) -> dict:
        assert all(b.lease is not None for b in batches)
        with grpc.insecure_channel(cache.address) as channel:
            cache_pb2_grpc.CacheServiceStub(channel).DeletePrefix(
                cache_pb2.DeletePrefixRequest(prefix_id=prefix_id), timeout=10)
        time.sleep(0.3)
        plane = client.plane
        assert plane is not None
        return {"held": _by_index(batches), "mapped_while_held": plane.arenas,
                "leases_while_held": _stats(cache.address).shm_leases}

    _, seen = _read_records(cache.address, socket_path, prefix_id, layout, "shm", delete_while_held)
    assert seen["held"] == expected  # deleted meanwhile: the leased pages were not freed
    assert seen["leases_while_held"] >= 1 and seen["mapped_while_held"] >= 1
    _wait_for(lambda: _stats(cache.address).shm_leases == 0)


def test_the_server_forgets_a_deleted_prefix_s_arena_on_the_client(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    _, (prefix_id, layout) = _answers(model, cache.address, "grpc", socket_path, [17] * 170)

    async def main() -> tuple[int, int]:
        client = CacheClient((cache.address,), 64 << 20, 30.0, data_path="shm", shm_socket=socket_path,
                             shm_slots=4, shm_slot_bytes=64 << 10)
        try:
            stream = await client.open_stream_at(cache.address, prefix_id, layout, 64 << 10)
            await stream.read(1, "kv/G0", [0])
            batch = await anext(stream.responses())
            assert batch.lease is not None and batch.shm is not None and batch.shm.arena
            batch.lease.release()
            await stream.close()
            plane = client.plane
            assert plane is not None
            mapped = plane.arenas
            with grpc.insecure_channel(cache.address) as channel:
                cache_pb2_grpc.CacheServiceStub(channel).DeletePrefix(
                    cache_pb2.DeletePrefixRequest(prefix_id=prefix_id), timeout=10)
            deadline = time.monotonic() + 10
            while plane.alive and plane.arenas == mapped and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # ``alive`` reads the server's messages
            return mapped, plane.arenas if plane.alive else -1
        finally:
            await client.close()

    mapped, after = asyncio.run(main())
    assert after == mapped - 1  # unmapped on ``forget``, and the plane lives on


def _register(model: LoadedModel, address: str, prefix: list[int]) -> tuple[str, str]:
    """Store a prefix without reading any of it back (nothing of it in the DRAM cache)."""
    async def main() -> tuple[str, str]:
        config = ComputeServerConfig(model=MODEL, cache=(address,), device="cpu", dtype="float32")
        client = CacheClient(config.cache, config.max_message_bytes, 60.0)
        core = ComputeCore(config, model, ModelRunner(model), client)
        try:
            reg = await core.register(prefix, [])
            return reg.prefix_id, core.layout_name
        finally:
            core.close()
            await client.close()

    return asyncio.run(main())


def test_a_batch_that_finds_no_slot_is_looked_up_in_dram_once(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    """With 2 slots and 4 batches in flight some batches go as bytes: each record is still one
    access of the DRAM cache (a hit or a miss), as the eviction rules count it."""
    prefix_id, layout = _register(model, cache.address, [23] * 600)

    async def main() -> int:
        client = CacheClient((cache.address,), 64 << 20, 30.0, data_path="shm", shm_socket=socket_path,
                             shm_slots=2, shm_slot_bytes=16 << 10)
        try:
            stream = await client.open_stream_at(cache.address, prefix_id, layout, 16 << 10)
            records = 0
            await stream.read(1, "kv/G0", list(range(-(-600 // 16) * 4)))  # all of it (random:tiny: one group)
            async for batch in stream.responses():
                records += len(batch.indices)
                if batch.lease is not None:
                    batch.lease.release()
                if batch.done:
                    break
            await stream.close()
            return records
        finally:
            await client.close()

    before = _stats(cache.address)
    records = asyncio.run(main())
    after = _stats(cache.address)
    looked_up = (after.dram_hits + after.dram_misses) - (before.dram_hits + before.dram_misses)
    served, via_shm = after.bytes_served - before.bytes_served, after.bytes_served_shm - before.bytes_served_shm
    assert records > 0 and looked_up == records
    assert 0 < via_shm < served  # some batches found no free slot and went as bytes


def test_bad_in_place_descriptors_are_refused_before_their_bytes_are_used(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    _, (prefix_id, layout) = _answers(model, cache.address, "grpc", socket_path, [19] * 170)

    async def main() -> None:
        client = CacheClient((cache.address,), 64 << 20, 30.0, data_path="shm", shm_socket=socket_path,
                             shm_slots=4, shm_slot_bytes=64 << 10)
        try:
            stream = await client.open_stream_at(cache.address, prefix_id, layout, 64 << 10)
            await stream.read(1, "kv/G0", [0])
            [real] = [b async for b in _take(stream.responses(), 1)]
            ref = real.shm
            assert ref is not None and ref.arena and real.lease is not None
            plane = client.plane
            assert plane is not None
            state = plane.stream()
            size = ref.length
            crc = ref.crcs
            cases = [
                (dataclasses.replace(ref, arena=ref.arena + 1000), 1, "did not send"),
                (dataclasses.replace(ref, offsets=(1 << 40,)), 1, "outside arena"),
                (dataclasses.replace(ref, offsets=()), 1, "whole records"),
                (dataclasses.replace(ref, crcs=b"\0\0\0\1"), 1, "checksum mismatch"),
                (dataclasses.replace(ref, length=size + 1, offsets=(0, size)), 2, "whole records"),
            ]
            for bad, count, message in cases:
                with pytest.raises(PlaneError, match=message):
                    state.receive(_batch(bad, count))
            [good] = state.receive(_batch(dataclasses.replace(ref, lease=ref.lease + 1000), 1))
            assert bytes(good.data) == bytes(real.data) and crc == ref.crcs
            with pytest.raises(PlaneError, match="still holds"):
                state.receive(_batch(dataclasses.replace(ref, lease=ref.lease + 1000), 1))
            real.lease.release()
            await stream.close()
        finally:
            await client.close()

    asyncio.run(main())
    _wait_for(lambda: _stats(cache.address).shm_leases == 0)


async def _take(batches, count: int):  # type: ignore[no-untyped-def]
    async for batch in batches:
        yield batch
        count -= 1
        if count == 0:
            return


def test_a_lease_is_lent_once_and_comes_back_only_when_the_client_lets_go() -> None:
    plane, counters = _plane(2)
    released: list[int] = []

    class Held:
        def __init__(self, n: int) -> None:
            self.n = n

        def release(self) -> None:
            released.append(self.n)

    a, b = plane.open_stream(1), plane.open_stream(2)
    l1, l2, l3, l4 = a.lend(Held(1)), a.lend(Held(2)), b.lend(Held(3)), b.lend(Held(4))  # type: ignore[arg-type]
    assert len({l1, l2, l3, l4}) == 4 and counters.values()["shm_leases"] == 4
    assert a.sent_lease(l1) and a.sent_lease(l2) and b.sent_lease(l3)
    b.drop_lease(l4)  # never sent: back at once
    a.drop_lease(l1)  # sent: the client's, the server cannot take it back
    assert released == [4]
    with pytest.raises(proto.ProtocolError, match="not held on stream 2"):
        plane.unpin(2, [l1])
    plane.unpin(1, [l1])
    plane.end(1, holding=[], leases=[])  # l2 sent, not kept
    with pytest.raises(proto.ProtocolError, match="not held on stream 2"):
        plane.end(2, holding=[], leases=[l1])
    plane.end(2, holding=[], leases=[l3])  # the client still reads l3
    assert released == [4, 1, 2] and counters.values()["shm_leases"] == 1
    on_the_way = a.lend(Held(6))  # type: ignore[arg-type]
    plane.close()  # the client is gone: what it held comes back, and what was on its way
    assert released == [4, 1, 2, 3, 6] and counters.values()["shm_leases"] == 0
    assert not a.sent_lease(on_the_way) and released.count(6) == 1  # its batch is not sent, no error
    stream = plane.open_stream(3)
    lease = stream.lend(Held(5))  # type: ignore[arg-type]
    assert not stream.sent_lease(lease) and released[-1] == 5  # a closed plane sends nothing


# --- the slot ledger -----------------------------------------------------------------------------
def _plane(slots: int = 4) -> tuple[Plane, Counters]:
    counters = Counters()
    return Plane("p" * 32, mmap.mmap(-1, slots * 4096), slots, 4096, counters), counters


def test_a_slot_is_never_lent_twice_and_comes_back_only_when_the_client_lets_go() -> None:
    plane, counters = _plane(3)
    a, b = plane.open_stream(1), plane.open_stream(2)
    s1, s2, s3 = a.take(), a.take(), b.take()
    assert None not in (s1, s2, s3) and len({s1, s2, s3}) == 3
    assert a.take() is None and plane.free_slots == 0  # nothing left: the next batch goes as bytes
    assert a.sent(s1) and a.sent(s2) and b.sent(s3)
    plane.drop(s1)  # a sent slot is the client's: the server cannot take it back
    assert plane.free_slots == 0
    with pytest.raises(proto.ProtocolError, match="not held on stream 2"):
        plane.release(2, [s1])  # stream 2 does not hold s1
    plane.release(1, [s1])
    assert plane.free_slots == 1 and counters.values()["shm_slots_lent"] == 2
    plane.end(1, holding=[])  # stream 1 over: s2 (sent, not held) is free again
    plane.end(2, holding=[s3])  # stream 2 over, the client still reads s3
    assert plane.free_slots == 2
    plane.release(2, [s3])  # released after the end: fine
    assert plane.free_slots == 3 and counters.values()["shm_slots_lent"] == 0
    with pytest.raises(Exception, match="already used"):
        plane.open_stream(1)  # a stream id is never reused on a plane


def test_a_batch_written_after_its_stream_ended_is_not_sent_and_frees_its_slot() -> None:
    plane, _ = _plane(2)
    stream = plane.open_stream(7)
    slot = stream.take()
    assert slot is not None
    plane.end(7, holding=[])  # the client gave up while the batch was being written
    assert not stream.sent(slot) and plane.free_slots == 2
    assert stream.take() is None  # an ended stream takes nothing more


def test_closing_a_plane_frees_what_the_client_held_and_drops_what_is_still_written() -> None:
    plane, counters = _plane(3)
    stream = plane.open_stream(1)
    held, writing = stream.take(), stream.take()
    assert held is not None and writing is not None and stream.sent(held)
    plane.close()
    assert counters.values()["shm_slots_lent"] == 1  # the one still being written
    plane.drop(writing)
    assert counters.values()["shm_slots_lent"] == 0 and plane.take() is None


# --- checks on the client side -------------------------------------------------------------------
def _client_plane(socket_path: str) -> ShmPlane:
    return ShmPlane.connect(socket_path, 4, 4096)


def _batch(ref: ShmRef, count: int) -> FetchBatch:
    return FetchBatch(1, "kv/0", list(range(count)), memoryview(b""), True, False, 0, "", ref)


def test_every_bad_descriptor_is_refused_before_its_bytes_are_used(cache: launch.ServiceProcess,
                                                                  socket_path: str) -> None:
    plane = _client_plane(socket_path)
    try:
        state = plane.stream()
        zeros = crc32_any_size(bytes(1024)).to_bytes(4, "little")
        cases = [
            (ShmRef(9, 0, 1024, zeros), 1, "outside the buffer"),
            (ShmRef(0, 4000, 1024, zeros), 1, "outside the buffer"),
            (ShmRef(0, 0, 1000, zeros * 3), 3, "whole records"),
            (ShmRef(0, 0, 1024, zeros), 2, "whole records"),
            (ShmRef(0, 0, 1024, b"\0\0\0\1"), 1, "checksum mismatch"),
        ]
        for ref, count, message in cases:
            with pytest.raises(PlaneError, match=message):
                state.receive(_batch(ref, count))
            assert state.held == 0  # nothing kept from a refused descriptor
        [good] = state.receive(_batch(ShmRef(1, 0, 2048, zeros * 2), 2))
        assert bytes(good.data) == bytes(2048) and good.lease is not None and state.held == 1
        with pytest.raises(PlaneError, match="still holds"):
            state.receive(_batch(ShmRef(1, 0, 1024, zeros), 1))
        good.lease.release()
        good.lease.release()  # idempotent
        assert state.held == 0
        # the server never lent slot 1 (these descriptors were made up): it ends the plane
        _wait_for(lambda: not plane.alive)
    finally:
        plane.close()


def test_past_half_the_slots_held_a_batch_is_copied_out_and_its_slot_given_back(
        cache: launch.ServiceProcess, socket_path: str) -> None:
    plane = _client_plane(socket_path)  # 4 slots: at most 2 held before batches are copied out
    try:
        state = plane.stream()
        zeros = crc32_any_size(bytes(1024)).to_bytes(4, "little")
        kept = [state.receive(_batch(ShmRef(slot, 0, 1024, zeros), 1))[0] for slot in (0, 1)]
        assert all(b.lease is not None for b in kept) and state.held == 2 and state.bytes_copied == 0
        [copied] = state.receive(_batch(ShmRef(2, 0, 1024, zeros), 1))
        assert copied.lease is None and bytes(copied.data) == bytes(1024)
        assert not copied.data.readonly  # a private, writable copy: the slot went back at once
        assert state.held == 2 and state.bytes_copied == 1024
        for batch in kept:
            assert batch.lease is not None
            batch.lease.release()
        assert state.held == 0
        [again] = state.receive(_batch(ShmRef(3, 0, 1024, zeros), 1))
        assert again.lease is not None  # room again: leased in place
    finally:
        plane.close()


def test_a_control_message_that_breaks_the_protocol_ends_only_that_plane(cache: launch.ServiceProcess,
                                                                        socket_path: str) -> None:
    for message in (b"not json", proto.encode(proto.RELEASE, stream=1, slots=[3]),
                    proto.encode("bogus", stream=1), proto.encode(proto.RELEASE, stream=1, slots=[99])):
        plane = _client_plane(socket_path)
        try:
            plane._sock.send(message)
            _wait_for(lambda: not plane.alive)
        finally:
            plane.close()
    _wait_for(lambda: _stats(cache.address).shm_planes == 0)
    plane = _client_plane(socket_path)  # the server still opens planes
    assert plane.alive
    plane.close()


def test_a_hello_that_lies_about_its_buffer_is_refused(cache: launch.ServiceProcess, socket_path: str) -> None:
    fd = os.memfd_create("too-small")
    os.ftruncate(fd, 4096)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(socket_path)
        socket.send_fds(sock, [proto.encode(proto.HELLO, slots=4, slot_bytes=4096)], [fd])
        answer = proto.decode(sock.recv(proto.MAX_MESSAGE))
    os.close(fd)
    assert answer["op"] == proto.ERROR and "holds 4096 bytes, not the 16384" in answer["message"]


def test_the_socket_and_its_directory_belong_to_the_server_s_user_alone(socket_path: str,
                                                                       cache: launch.ServiceProcess) -> None:
    info = os.stat(socket_path)
    assert info.st_mode & 0o777 == 0o600 and info.st_uid == os.getuid()
    assert os.stat(Path(socket_path).parent).st_mode & 0o777 == 0o700


def test_the_socket_admits_only_the_servers_own_user(tmp_path: Path) -> None:
    if os.getuid() != 0:  # the file modes are checked without root by the test above
        pytest.skip("connecting as another user needs root to switch users")
    outer = Path(tempfile.mkdtemp(prefix="ckv-shm-perm-"))  # traversable by others, unlike tmp_path
    os.chmod(outer, 0o711)
    socket_path = str(outer / "run" / "plane.sock")
    probe = ("import os, socket, sys\n"
             "os.setgid(65534); os.setuid(65534)\n"
             "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('denied'); sys.exit(0)\n"
             "print(s.recv(65536).decode())\n")

    def as_nobody() -> str:
        return subprocess.run([sys.executable, "-c", probe, socket_path], capture_output=True, text=True,
                              timeout=30).stdout

    try:
        with launch.cache_server(tmp_path / "store", "--shm-socket", socket_path):
            info = os.stat(socket_path)
            assert info.st_mode & 0o777 == 0o600 and info.st_uid == os.getuid()
            assert os.stat(Path(socket_path).parent).st_mode & 0o777 == 0o700
            assert as_nobody().strip() == "denied"  # file modes keep other users out
            os.chmod(Path(socket_path).parent, 0o711)
            os.chmod(socket_path, 0o666)
            # and with the modes opened up, the peer-credential check still refuses them
            assert "peer uid 65534 is not the cache server's uid 0" in as_nobody()
    finally:
        shutil.rmtree(outer, ignore_errors=True)


# --- crashes -------------------------------------------------------------------------------------
HOLDER = """
import asyncio, sys
from contiguouskv.compute_server.cachenet.cache_client import CacheClient

async def main():
    address, socket_path, prefix_id, layout = sys.argv[1:5]
    client = CacheClient((address,), 64 << 20, 60.0, data_path="shm", shm_socket=socket_path,
                         shm_slots=4, shm_slot_bytes=64 << 10)
    stream = await client.open_stream_at(address, prefix_id, layout, 64 << 10)
    await stream.read(1, "kv/G0", list(range(8)))
    batches = stream.responses()
    batch = await anext(batches)
    assert batch.lease is not None
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_sigkill_of_the_client_mid_stream_frees_its_plane_and_leaks_no_memory(
        cache: launch.ServiceProcess, model: LoadedModel, socket_path: str) -> None:
    _, (prefix_id, layout) = _answers(model, cache.address, "grpc", socket_path, [7] * 160)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cache.address, socket_path, prefix_id, layout],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding", holder.stderr.read()
        _wait_for(lambda: _stats(cache.address).shm_planes == 1)
        held = _stats(cache.address)  # the records are in DRAM since the gRPC run: read in place, leased
        assert held.shm_leases >= 1 and held.bytes_served_in_place > 0 and _plane_mappings(cache.proc.pid) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _wait_for(lambda: _stats(cache.address).shm_planes == 0 and _stats(cache.address).shm_slots_lent == 0
              and _stats(cache.address).shm_leases == 0)
    _wait_for(lambda: _plane_mappings(cache.proc.pid) == 0)  # the server let go of the buffer too
    again, _ = _answers(model, cache.address, "shm", socket_path, [7] * 160)  # and serves on
    assert len(again) == 2 * len(POLICIES)


def test_sigkill_of_the_cache_server_mid_stream_fails_the_stream_and_a_restart_opens_a_new_plane(
        model: LoadedModel, tmp_path: Path) -> None:
    socket_path = str(tmp_path / "run" / "plane.sock")
    servers = [launch.cache_server(tmp_path / "store", "--shm-socket", socket_path)]
    address = servers[0].wait_ready()
    _, (prefix_id, layout) = _answers(model, address, "grpc", socket_path, [9] * 160)

    gc.collect()
    base = _plane_mappings()  # buffers of earlier tests' planes still referenced in this process

    async def main() -> tuple[str, int, int]:
        client = CacheClient((address,), 64 << 20, 30.0, data_path="shm", shm_socket=socket_path,
                             shm_slots=4, shm_slot_bytes=64 << 10)
        try:
            stream = await client.open_stream_at(address, prefix_id, layout, 64 << 10)
            await stream.read(1, "kv/G0", list(range(8)))
            batches = stream.responses()
            first = await anext(batches)
            assert first.lease is not None and _plane_mappings() == base + 1
            servers[0].proc.send_signal(signal.SIGKILL)
            servers[0].proc.wait()
            code = "no error"
            try:
                while True:
                    await anext(batches)
            except Exception as exc:  # noqa: BLE001 - the code is asserted below
                code = getattr(exc, "code", repr(exc))
            first.lease.release()  # after the server is gone: a no-op, no error
            await stream.close()
            assert client.plane is None  # the dead plane is noticed
            servers.append(launch.cache_server(tmp_path / "store", "--shm-socket", socket_path))
            again = servers[-1].wait_ready()
            stream = await client.open_stream_at(again, prefix_id, layout, 64 << 10)
            await stream.read(2, "kv/G0", [0])
            batch = await anext(stream.responses())
            assert batch.lease is not None
            await stream.close()
            del first, batch, batches, stream
            gc.collect()
            return code, 1, _plane_mappings() - base
        finally:
            await client.close()

    try:
        code, leased, mappings = asyncio.run(main())
    finally:
        for server in servers:
            server.stop()
    assert code in ("UNAVAILABLE", "INTERNAL", "CANCELLED") and leased == 1
    assert mappings == 1  # the dead plane's buffer was unmapped; only the new one is left


def test_a_plane_is_no_way_around_tokens_the_fetch_call_still_needs_one(model: LoadedModel, tmp_path: Path) -> None:
    token = "t" * 8 + "-compute-to-cache"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} read,write compute\n")
    socket_path = str(tmp_path / "run" / "plane.sock")
    with launch.cache_server(tmp_path / "store", "--shm-socket", socket_path,
                             "--auth-tokens-file", str(tokens)) as server:
        async def fetch(with_token: str | None) -> int:
            client = CacheClient((server.address,), 64 << 20, 30.0, data_path="shm", shm_socket=socket_path,
                                 shm_slots=4, shm_slot_bytes=64 << 10, token=with_token)
            core = ComputeCore(ComputeServerConfig(model=MODEL, cache=(server.address,), device="cpu",
                                                   dtype="float32"), model, ModelRunner(model), client)
            try:
                reg = await core.register([3] * 160)
                out = await core.reprefill(ReprefillArgs(reg.prefix_id, [1, 2], "full", 1.0))
                return out.token_id
            finally:
                await asyncio.gather(*core._reports, return_exceptions=True)
                core.close()
                await client.close()

        assert asyncio.run(fetch(token)) >= 0  # the plane opened, and the token let the calls through
        assert _stats_with(server.address, token).bytes_served_shm > 0
        with pytest.raises(Exception, match="UNAUTHENTICATED|token"):
            asyncio.run(fetch(None))  # the socket alone gets no one past the token check


def _stats_with(address: str, token: str) -> cache_pb2.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return cache_pb2_grpc.CacheServiceStub(channel).GetStats(
            cache_pb2.GetStatsRequest(), timeout=10, metadata=[("authorization", f"Bearer {token}")])
