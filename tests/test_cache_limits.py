"""Limits and bad input through a real cache server: memory under a stalled consumer, a full disk
(a small loop-mounted ext4), the buffered fallback (ramfs has no O_DIRECT), deletes during reads,
malformed ids and index lists."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conftest import CacheProc, start_cache_server, wait_for_log
from contiguouskv.cache_server.fetch import MAX_INDICES_PER_READ
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc
from test_cache_server import (
    OPTIONS,
    expect_status,
    fetch,
    open_,
    put,
    put_requests,
    read,
    read_all,
    records_of,
    wait_until_stalled,
)

MiB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stalled_consumer_stays_within_the_inflight_limit(tmp_path: Path) -> None:
    limit = 4 * MiB
    server = start_cache_server(tmp_path / "root", "--dram-cache-bytes", "0",
                                "--max-inflight-bytes", str(limit), "--max-batch-bytes", str(MiB))
    records = records_of([("a", 768, 128 * 1024)], seed=5)  # 96 MiB

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("big", "l", records, chunk=32))
            await fetch(stub, [open_("big"), read(1, "a", range(256))])  # warm the read buffers
            baseline = rss_bytes(server.proc.pid)
            call = stub.Fetch(timeout=60)
            await call.write(open_("big"))
            await call.write(read(1, "a", range(768)))
            first = await call.read()
            await wait_until_stalled(stub)
            stats = await stub.GetStats(pb.GetStatsRequest())
            grown = rss_bytes(server.proc.pid) - baseline
            assert stats.inflight_streams == 1 and 0 < stats.inflight_bytes <= limit
            # what left the server = taken by the client + HTTP/2 window and socket buffers
            assert stats.bytes_served - 256 * 128 * 1024 < 24 * MiB
            assert grown < limit + 24 * MiB, f"server grew by {grown / MiB:.1f} MiB"
            await call.done_writing()
            rest = await read_all(call)  # the stream then finishes normally
            assert [i for r in [first, *rest] for i in r.indices] == list(range(768))
            after = await stub.GetStats(pb.GetStatsRequest())
            assert (after.inflight_streams, after.inflight_bytes, after.inflight_reads) == (0, 0, 0)

    try:
        asyncio.run(scenario())
    finally:
        assert server.stop() == 0


def test_delete_during_a_read_finishes_that_read(cache_server: CacheProc) -> None:
    records = records_of([("a", 256, 64 * 1024)], seed=6)  # 16 MiB

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(cache_server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("del", "l", records, chunk=64))
            call = stub.Fetch(timeout=30)
            await call.write(open_("del", max_batch_bytes=64 * 1024))
            await call.write(read(1, "a", range(256)))
            first = await call.read()
            deleted = await stub.DeletePrefix(pb.DeletePrefixRequest(prefix_id="del"))
            assert deleted.layouts_deleted == 1
            await expect_status(grpc.StatusCode.NOT_FOUND, fetch(stub, [open_("del")]))
            await call.done_writing()
            rest = await read_all(call)
            assert await call.code() == grpc.StatusCode.OK
            got = [first, *rest]
            assert b"".join(r.data for r in got) == b"".join(records["a"])
            assert not (cache_server.root / "objects" / "del").exists()

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", ["../x", "/", "a/b", "a\x00b", "..", "", "x" * 200])
def test_prefix_ids_with_path_characters(cache_server: CacheProc, bad: str) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(cache_server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            INVALID = grpc.StatusCode.INVALID_ARGUMENT
            await expect_status(INVALID, put(stub, put_requests(bad, "l", records_of([("a", 1, 10)]))))
            await expect_status(INVALID, stub.GetManifest(pb.GetManifestRequest(prefix_id=bad, layout="l")))
            await expect_status(INVALID, fetch(stub, [open_(bad)]))
            await expect_status(INVALID, stub.ReportAttention(pb.ReportAttentionRequest(prefix_id=bad, layout="l")))
            await expect_status(INVALID, put(stub, put_requests("ok", bad or "-", records_of([("a", 1, 10)]))))
            if bad:
                await expect_status(INVALID, stub.DeletePrefix(pb.DeletePrefixRequest(prefix_id=bad)))
                await expect_status(INVALID, stub.ListPrefixes(pb.ListPrefixesRequest(prefix_id=bad)))

    asyncio.run(scenario())
    assert sorted(p.name for p in cache_server.root.rglob("*")) == [".lock", "objects"]  # the server's own only


def test_empty_and_huge_index_lists(cache_server: CacheProc) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(cache_server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("idx", "l", records_of([("a", 4, 100)])))
            empty = await fetch(stub, [open_("idx"), read(1, "a", [])])
            assert [(r.tag, list(r.indices), r.done, r.data) for r in empty] == [(1, [], True, b"")]
            huge = [0] * (MAX_INDICES_PER_READ + 1)
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                fetch(stub, [open_("idx"), read(2, "a", huge)]), "indices")
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                fetch(stub, [open_("idx"), read(3, "a", [2**63])]), "out of range")
            ok = await fetch(stub, [open_("idx"), read(4, "a", [3, 3, 0])])
            assert [i for r in ok for i in r.indices] == [3, 3, 0]  # repeats are served as asked

    asyncio.run(scenario())


def test_reput_is_idempotent_and_rewrites_nothing(cache_server: CacheProc) -> None:
    records = records_of([("a", 8, 4096)], seed=9)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(cache_server.address, options=OPTIONS) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await put(stub, put_requests("same", "l", records))
            data = cache_server.root / "objects" / "same" / "l.data"
            before = (data.stat().st_ino, data.stat().st_mtime_ns)
            other = records_of([("a", 8, 4096)], seed=10)  # same shape, other bytes: not stored
            again = await put(stub, put_requests("same", "l", other))
            assert again.already_committed and again.bytes_written == 0
            assert (data.stat().st_ino, data.stat().st_mtime_ns) == before
            got = await fetch(stub, [open_("same"), read(1, "a", range(8))])
            assert b"".join(r.data for r in got) == b"".join(records["a"])

    asyncio.run(scenario())


# -- filesystems -----------------------------------------------------------------------------

@contextlib.contextmanager
def mounted(kind: str, where: Path, size_mib: int) -> Iterator[Path]:
    """Mount a small ext4 image (``ext4``) or a ramfs at ``where``; skip where that is refused."""
    where.mkdir(parents=True)
    if kind == "ext4":
        image = where.with_suffix(".img")
        with open(image, "wb") as f:
            f.truncate(size_mib * MiB)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True)
        command = ["mount", "-o", "loop", str(image), str(where)]
    else:
        made = subprocess.CompletedProcess([], 0)
        command = ["mount", "-t", "ramfs", "ramfs", str(where)]
    if os.geteuid() != 0 or made.returncode != 0 or subprocess.run(command, capture_output=True).returncode:
        pytest.skip(f"cannot mount a {kind} here (needs root and {'loop devices' if kind == 'ext4' else 'ramfs'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        for block in (bytes(MiB), bytes(4096), b"x"):
            with contextlib.suppress(OSError):
                while f.write(block):
                    pass
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())


def test_disk_full_during_put_prefix(tmp_path: Path) -> None:
    with mounted("ext4", tmp_path / "disk", 32) as disk:
        server = start_cache_server(disk / "root")
        keep = records_of([("a", 64, 32768)], seed=1)  # 2 MiB
        big = records_of([("a", 16, 32768)], seed=2)

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
                stub = cache_pb2_grpc.CacheServiceStub(channel)
                await put(stub, put_requests("keep", "l", keep, chunk=16))
                # larger than the disk: refused before anything is written
                await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    put(stub, put_requests("huge", "l", records_of([("a", 1, 100)])
                                                           | {"b": [bytes(16 * MiB)] * 3})), "disk")
                # the disk fills up while a put is open: its commit cannot write the manifest
                header, *data, commit = put_requests("late", "l", big, chunk=4)
                call = stub.PutPrefix(timeout=30)
                for request in (header, *data):
                    await call.write(request)
                await asyncio.sleep(0.3)
                fill_disk(disk / "filler")
                await call.write(commit)
                await call.done_writing()
                await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, call, "disk full")
                listed = await stub.ListPrefixes(pb.ListPrefixesRequest())
                assert [m.prefix_id for m in listed.manifests] == ["keep"]
                got = await fetch(stub, [open_("keep"), read(1, "a", range(64))])
                assert b"".join(r.data for r in got) == b"".join(keep["a"])
                (disk / "filler").unlink()
                assert not (await put(stub, put_requests("late", "l", big))).already_committed

        try:
            asyncio.run(scenario())
        finally:
            server.stop()
        names = sorted(p.name for p in (disk / "root" / "objects").rglob("*"))
        assert names == ["keep", "l.data", "l.data", "l.manifest", "l.manifest", "late"]


def test_buffered_fallback_without_o_direct(tmp_path: Path) -> None:
    with mounted("ramfs", tmp_path / "ram", 0) as ram:
        server = start_cache_server(ram / "root", "--metrics-port", "0")
        records = records_of([("a", 8, 5000)], seed=3)

        async def scenario() -> pb.GetStatsResponse:
            async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
                stub = cache_pb2_grpc.CacheServiceStub(channel)
                await put(stub, put_requests("ram", "l", records))
                got = await fetch(stub, [open_("ram"), read(1, "a", [7, 0, 1])])
                assert b"".join(r.data for r in got) == records["a"][7] + records["a"][0] + records["a"][1]
                return await stub.GetStats(pb.GetStatsRequest())

        try:
            stats = asyncio.run(scenario())
            assert not stats.direct_io and stats.buffered_reads == stats.disk_reads > 0
            assert "O_DIRECT unavailable" in server.log() and "reads buffered" in server.log()
            port = int(wait_for_log(server, r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
            import urllib.request

            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert "ckv_cache_direct_io 0.0" in text
            assert f"ckv_cache_buffered_reads_total {float(stats.buffered_reads)}" in text
        finally:
            assert server.stop() == 0
