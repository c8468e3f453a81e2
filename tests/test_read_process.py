"""Fetch reads in helper processes (cache_server/read_process.py): real helpers, real files, O_DIRECT."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from conftest import start_cache_server, wait_for_log
from contiguouskv.cache_server.assemble import BatchAssembler
from contiguouskv.cache_server.buffers import ReadBuffers
from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.errors import DataLoss
from contiguouskv.cache_server.keys import ObjectKey, object_paths
from contiguouskv.cache_server.native_aio import open_native_aio
from contiguouskv.cache_server.read_process import ENGINES, THREADS, ReadProcesses
from contiguouskv.cache_server.store import RecordStore
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc
from test_cache_server import fetch, open_, put, put_requests, read, records_of
from test_cache_store import make_records
from test_cache_store import put as store_put

KEY = ObjectKey("p", "l")
REGIONS = [("kv/G0", 40, 5000), ("kv/G1", 24, 8192)]  # padded to 8 KiB, and exactly 8 KiB


def native_aio_available() -> bool:
    aio, _ = open_native_aio(4)
    if aio is None:
        return False
    aio.close()
    return True


@pytest.fixture(params=ENGINES)
async def helpers(request: pytest.FixtureRequest) -> AsyncIterator[ReadProcesses]:
    """Two helpers reading with each engine: native AIO (O_DIRECT files here) and threads."""
    procs = ReadProcesses(processes=2, threads=3, slots=2, slot_bytes=1 << 20, engine=request.param)
    procs.start()
    await procs.ready()
    try:
        if request.param == THREADS or not native_aio_available():
            assert procs.engines == ["threads"] * 2
        else:  # the AIO path is what these tests exercise, not a silent fallback to threads
            assert procs.engines == ["native AIO, 12 reads in flight"] * 2
        yield procs
    finally:
        procs.close()


def stored(tmp_path: Path) -> tuple[RecordStore, dict[str, list[bytes]]]:
    store = RecordStore(CacheServerConfig(root=tmp_path / "root", dram_cache_bytes=0))
    records = make_records(REGIONS, seed=3)
    store_put(store, KEY, records)
    return store, records


async def test_helper_reads_equal_the_records_and_in_process_reads(
        tmp_path: Path, helpers: ReadProcesses) -> None:
    store, records = stored(tmp_path)
    with store.open_object(KEY) as reader:
        assembler = BatchAssembler(reader, DramCache(0), ReadBuffers(1 << 20), store.counters)
        before = store.counters.values()
        for region, indices in [("kv/G0", [7, 3, 4, 5, 39, 3]), ("kv/G1", list(range(24))), ("kv/G0", [0])]:
            layout = reader.manifest.region(region)
            batch = await assembler.build_in_helper(helpers, 9, layout, indices, True)
            assert batch is not None
            assert bytes(batch.data) == b"".join(records[region][i] for i in indices)
            assert batch.wire == assembler.build(9, layout, indices, True).wire
        after = store.counters.values()
    # both ways counted their reads: distinct records only, padded to the stride, amplification 1
    padded = 2 * (5 * 8192 + 8192) + 2 * 24 * 8192
    assert after["bytes_read_from_disk"] - before["bytes_read_from_disk"] == padded
    assert helpers.free_slots == 2


@pytest.mark.parametrize(("region", "bad", "asked"), [
    ("kv/G0", 2, [1, 2, 3]),  # padded records: checked one by one
    ("kv/G1", 5, [3, 4, 5, 6, 7]),  # back to back: one CRC-32 of the run, then the culprit named
])
async def test_a_flipped_byte_is_data_loss_through_a_helper(
        tmp_path: Path, helpers: ReadProcesses, region: str, bad: int, asked: list[int]) -> None:
    store, records = stored(tmp_path)
    with store.open_object(KEY) as reader:
        layout = reader.manifest.region(region)
    data = object_paths(tmp_path / "root", KEY).data
    with open(data, "r+b") as f:  # last payload byte of the bad record
        f.seek(layout.record_offset(bad) + layout.record_size - 1)
        byte = f.read(1)
        f.seek(layout.record_offset(bad) + layout.record_size - 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with store.open_object(KEY) as reader:
        assembler = BatchAssembler(reader, DramCache(0), ReadBuffers(1 << 20), store.counters)
        with pytest.raises(DataLoss, match=f"record {bad}$"):
            await assembler.build_in_helper(helpers, 1, layout, asked, True)
        assert store.counters.values()["checksum_failures"] == 1
        good = [i for i in asked if i != bad]
        batch = await assembler.build_in_helper(helpers, 2, layout, good, True)
        assert batch is not None and bytes(batch.data) == b"".join(records[region][i] for i in good)
    assert helpers.free_slots == 2


async def test_a_truncated_data_file_is_data_loss_through_a_helper(
        tmp_path: Path, helpers: ReadProcesses) -> None:
    """The read of a run comes back short (the rest is read again, then nothing): DATA_LOSS, and the
    records before the cut still read."""
    store, records = stored(tmp_path)
    with store.open_object(KEY) as reader:
        layout = reader.manifest.region("kv/G1")
    os.truncate(object_paths(tmp_path / "root", KEY).data, layout.record_offset(20))
    with store.open_object(KEY) as reader:
        assert reader.direct  # the helpers' O_DIRECT path, native AIO where the fixture asks for it
        assembler = BatchAssembler(reader, DramCache(0), ReadBuffers(1 << 20), store.counters)
        with pytest.raises(DataLoss, match=f"ends at {layout.record_offset(20)}, before the 49152 bytes at "
                                           f"{layout.record_offset(18)}"):
            await assembler.build_in_helper(helpers, 1, layout, [18, 19, 20, 21, 22, 23], True)
        batch = await assembler.build_in_helper(helpers, 2, layout, [17, 18, 19], True)
        assert batch is not None and bytes(batch.data) == b"".join(records["kv/G1"][17:20])
    assert helpers.free_slots == 2


async def test_a_cancelled_read_keeps_its_slot_until_the_helper_answers(
        tmp_path: Path, helpers: ReadProcesses) -> None:
    store, records = stored(tmp_path)
    with store.open_object(KEY) as reader:
        assembler = BatchAssembler(reader, DramCache(0), ReadBuffers(1 << 20), store.counters)
        layout = reader.manifest.region("kv/G1")
        for pid in helpers.pids:  # the helpers take the requests but cannot answer yet
            os.kill(pid, signal.SIGSTOP)
        try:
            tasks = [asyncio.create_task(assembler.build_in_helper(helpers, t, layout, list(range(24)), True))
                     for t in (1, 2)]
            await asyncio.sleep(0.05)  # both requests are with the helpers now
            assert helpers.free_slots == 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.2)
            assert helpers.free_slots == 0, "a slot a helper may still write into was handed back"
            assert await assembler.build_in_helper(helpers, 4, layout, [1], True) is None  # no slot free
        finally:
            for pid in helpers.pids:
                os.kill(pid, signal.SIGCONT)
        # the slots come back with the answers
        deadline = time.monotonic() + 10
        while helpers.free_slots < 2:
            assert time.monotonic() < deadline, "cancelled reads' slots never came back"
            await asyncio.sleep(0.01)
        batch = await assembler.build_in_helper(helpers, 3, layout, [5, 6], True)
        assert batch is not None and bytes(batch.data) == records["kv/G1"][5] + records["kv/G1"][6]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_killed_helpers_leave_fetch_correct_and_exit_with_the_server(tmp_path: Path) -> None:
    server = start_cache_server(tmp_path / "root", "--read-processes", "2", "--read-threads", "4")
    try:
        if native_aio_available():  # the default engine: helpers killed with native reads in flight
            wait_for_log(server, r"(?m)O_DIRECT reads by native AIO, 8 reads in flight$")
        helpers = _children(server.proc.pid)
        assert len(helpers) == 2, helpers
        records = records_of([("a", 50, 5000)])
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("k", "l", records))
            wanted = [read(1, "a", list(range(50))), read(2, "a", [49, 0, 7])]
            expected = {1: b"".join(records["a"]), 2: records["a"][49] + records["a"][0] + records["a"][7]}

            async def check() -> None:
                responses = await fetch(stub, [open_("k", max_batch_bytes=20000), *wanted])
                assert not any(r.error_code for r in responses)
                for tag, data in expected.items():
                    assert b"".join(r.data for r in responses if r.tag == tag) == data

            await check()
            os.kill(helpers[0], signal.SIGKILL)
            await check()  # the other helper, or the server's threads, read it
            os.kill(helpers[1], signal.SIGKILL)
            await check()  # no helper left: the server's own read threads
            stats = await stub.GetStats(pb.GetStatsRequest())
            assert stats.checksum_failures == 0 and stats.inflight_reads == 0
        assert server.proc.poll() is None
    finally:
        server.proc.kill()
        server.proc.wait(10)


async def test_helpers_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    orphans = []
    # the default is one helper reading by native AIO (unless the kernel refuses it)
    for extra, count in (((), 1), (("--read-processes", "2", "--read-engine", THREADS), 2)):
        server = start_cache_server(tmp_path / f"root{count}", *extra)
        if count == 2:
            wait_for_log(server, r"(?m)O_DIRECT reads by threads$")  # the flag reached the helpers
        elif native_aio_available():
            wait_for_log(server, r"(?m)O_DIRECT reads by native AIO, 64 reads in flight$")
        helpers = _children(server.proc.pid)
        assert len(helpers) == count, helpers
        server.proc.kill()
        server.proc.wait(10)
        orphans += helpers
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in orphans):
        assert time.monotonic() < deadline, "helpers outlived their server"
        time.sleep(0.05)


async def test_read_processes_zero_reads_in_the_server_threads(tmp_path: Path) -> None:
    server = start_cache_server(tmp_path / "root", "--read-processes", "0")
    try:
        assert _children(server.proc.pid) == []
        records = records_of([("a", 9, 5000)])
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("z", "l", records))
            responses = await fetch(stub, [open_("z"), read(1, "a", [8, 1, 1])])
        assert b"".join(r.data for r in responses) == records["a"][8] + records["a"][1] * 2
    finally:
        server.proc.kill()
        server.proc.wait(10)


def test_read_processes_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read_processes"):
        CacheServerConfig(root=tmp_path, read_threads=4, read_processes=5)
    with pytest.raises(ValueError, match="read_processes"):
        CacheServerConfig(root=tmp_path, read_processes=-1)
    assert CacheServerConfig(root=tmp_path, read_threads=4, read_processes=4).read_processes == 4
    with pytest.raises(ValueError, match="read_engine: 'uring' is not one of aio, threads"):
        CacheServerConfig(root=tmp_path, read_engine="uring")
    with pytest.raises(ValueError, match="engine"):
        ReadProcesses(1, 1, 1, 4096, engine="uring")
