"""Crash safety: a cache server process SIGKILLed at several points of a PutPrefix, then restarted.

Every committed prefix must stay readable byte for byte, the interrupted prefix must be either
absent (crash before the manifest's rename) or whole (after it), and the restarted server must have
removed every leftover file of the interrupted write.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from conftest import CacheProc, start_cache_server
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc
from test_cache_server import OPTIONS, fetch, open_, put, put_requests, read, records_of

# Runs the cache server with os.rename wrapped to SIGKILL the process at one commit step.
CRASHING_SERVER = """
import os, signal, sys
point = sys.argv.pop(1)
real_rename = os.rename
def rename(src, dst, *args, **kwargs):
    last = str(dst).endswith(".manifest")
    if point == "before-manifest-rename" and last:
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst, *args, **kwargs)
    if (point == "after-data-rename" and str(dst).endswith(".data")) or (
            point == "after-manifest-rename" and last):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
from contiguouskv.cache_server.server import main
sys.exit(main())
"""
# Points the test kills the server from outside, after sending this many PutPrefix messages.
KILL_AFTER_MESSAGES = {"after-header": 1, "mid-data": 3, "before-commit": 5}
COMMIT_POINTS = ("after-data-rename", "before-manifest-rename", "after-manifest-rename")
KEEP = records_of([("kv/G0", 16, 32768), ("stats", 1, 100)], seed=11)
VICTIM = records_of([("kv/G0", 32, 8192)], seed=12)


async def _read_back(address: str, prefix: str, records: dict[str, list[bytes]]) -> None:
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        for region, recs in records.items():
            got = await fetch(stub, [open_(prefix), read(1, region, range(len(recs)))])
            assert b"".join(r.data for r in got) == b"".join(recs)


async def _list(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await cache_pb2_grpc.CacheServiceStub(channel).ListPrefixes(
            pb.ListPrefixesRequest(), timeout=10)
        return sorted(m.prefix_id for m in reply.manifests)


async def _interrupted_put(server: CacheProc, point: str) -> None:
    requests = put_requests("victim", "l", VICTIM, chunk=8)  # header, 4 data, commit
    async with grpc.aio.insecure_channel(server.address, options=OPTIONS) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        call = stub.PutPrefix(timeout=30)
        sent = KILL_AFTER_MESSAGES.get(point, len(requests))
        for request in requests[:sent]:
            await call.write(request)
        if point in KILL_AFTER_MESSAGES:
            victim_dir = server.root / "objects" / "victim"
            for _ in range(200):  # let the server act on what it got (the temp file exists)
                if victim_dir.exists() and any(victim_dir.iterdir()):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            server.proc.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(10) == -signal.SIGKILL


@pytest.mark.parametrize("point", [*KILL_AFTER_MESSAGES, *COMMIT_POINTS])
def test_sigkill_during_put_prefix_keeps_committed_and_hides_partial(tmp_path: Path,
                                                                     point: str) -> None:
    root = tmp_path / "root"
    with start_cache_server(root) as first:
        async def store_keep() -> None:
            async with grpc.aio.insecure_channel(first.address, options=OPTIONS) as channel:
                await put(cache_pb2_grpc.CacheServiceStub(channel), put_requests("keep", "l", KEEP))

        asyncio.run(store_keep())
    crashing = start_cache_server(root, launcher=("-c", CRASHING_SERVER, point))
    asyncio.run(_interrupted_put(crashing, point))
    committed = point == "after-manifest-rename"
    with start_cache_server(root) as again:
        assert asyncio.run(_list(again.address)) == (["keep", "victim"] if committed else ["keep"])
        asyncio.run(_read_back(again.address, "keep", KEEP))
        if committed:
            asyncio.run(_read_back(again.address, "victim", VICTIM))
        files = sorted(p.name for p in (root / "objects").rglob("*") if p.is_file())
        assert files == sorted(["l.data", "l.manifest"] * (2 if committed else 1))
        assert not (root / "objects" / "victim").exists() or committed
        if not committed:  # the prefix can be stored again after the crash
            async def store_victim() -> None:
                async with grpc.aio.insecure_channel(again.address, options=OPTIONS) as channel:
                    stub = cache_pb2_grpc.CacheServiceStub(channel)
                    assert not (await put(stub, put_requests("victim", "l", VICTIM))).already_committed

            asyncio.run(store_victim())
            asyncio.run(_read_back(again.address, "victim", VICTIM))
