"""A cache shard that goes silent (a stopped process, a partition) costs one ping timeout, not one per
call: the compute server's cache client calls it again only once it answers a probe (or after
``DOWN_S``). Real cache server, real gRPC; the ping-timeout error itself is the one a silent shard
produced (tens of seconds to provoke; measured by hand in docs/operations.md)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv import launch
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.errors import ComputeError, Unavailable

PING_TIMEOUT = "Stream removed (ping timeout)"  # what gRPC said of a SIGSTOPped cache server


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launch.ServiceProcess]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as proc:
        yield proc


def test_a_silent_shard_fails_fast_until_a_probe_gets_an_answer(cache: launch.ServiceProcess) -> None:
    address = cache.address

    async def main() -> None:
        client = CacheClient([address], 64 << 20, 30.0)
        try:
            assert await client.get_manifest("p" * 32, "contiguous-c16-g8") is None  # reachable, nothing stored
            client._note(address, Unavailable(f"cache server {address}: {PING_TIMEOUT}"))
            start = time.monotonic()
            with pytest.raises(Unavailable, match=r"ping timeout\) \(\d\.\d s ago; called again once it answers"):
                await client.get_manifest("p" * 32, "contiguous-c16-g8")
            with pytest.raises(Unavailable, match="ping timeout"):
                await client.open_stream_at(address, "p" * 32, "contiguous-c16-g8", 1 << 20)
            assert time.monotonic() - start < 1.0  # not one call made, not one timeout waited
            # the probe the first refusal sent found the shard answering: calls go to it again
            deadline = time.monotonic() + 5.0
            while address in client._silent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert address not in client._silent
            assert await client.get_manifest("p" * 32, "contiguous-c16-g8") is None
        finally:
            await client.close()

    asyncio.run(main())


def test_a_refused_connection_is_not_silence(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: refused at once, nothing to wait for
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"

    async def main() -> None:
        client = CacheClient([address], 64 << 20, 10.0)
        try:
            for _ in range(2):  # each call tries the shard again
                with pytest.raises(ComputeError) as info:
                    await client.get_manifest("p" * 32, "contiguous-c16-g8")
                assert info.value.code == "UNAVAILABLE" and "s ago" not in str(info.value)
            assert address not in client._silent
        finally:
            await client.close()

    asyncio.run(main())
