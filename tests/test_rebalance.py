"""`contiguouskv rebalance` against real cache servers (no compute server, no torch).

Objects are written with the compute server's CacheClient on two shards (R=2), a third shard is
added, and rebalance copies exactly the prefixes the new shard now owns, byte for byte; with
--delete the copies on shards that no longer own a prefix go; --drain empties a leaving shard.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from contiguouskv import cli
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.layouts.contiguous import Region
from contiguouskv.common.placement import placement_changes, replica_set
from contiguouskv.v1 import cache_pb2 as pb, cache_pb2_grpc
from conftest import CacheProc, start_cache_server

LAYOUTS = ("contiguous-c16-g8", "impress")
RECORD = 4096


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[CacheProc]]:
    procs = [start_cache_server(tmp_path / f"shard-{i}") for i in range(3)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def _payload(prefix_id: str, layout: str, region: str, index: int, size: int) -> bytes:
    seed = f"{prefix_id}/{layout}/{region}/{index}".encode()
    return (seed * (size // len(seed) + 1))[:size]


def _regions(n: int) -> list[Region]:
    return [Region("kv/G0", n, RECORD), Region("tokens", 1, 4 * 16 * n)]


async def _store(addresses: list[str], objects: list[tuple[str, str, int]]) -> None:
    client = CacheClient(addresses, 64 << 20, 30.0, replication=2)
    try:
        for prefix_id, layout, n in objects:
            payloads = [(r.name, i, memoryview(_payload(prefix_id, layout, r.name, i, r.record_size)))
                        for r in _regions(n) for i in range(r.num_records)]
            await client.put_prefix(prefix_id, layout, _regions(n), b'{"m": 1}', payloads)
    finally:
        await client.close()


def _objects(address: str) -> set[tuple[str, str]]:
    with grpc.insecure_channel(address) as channel:
        reply = cache_pb2_grpc.CacheServiceStub(channel).ListPrefixes(pb.ListPrefixesRequest(), timeout=10)
    return {(m.prefix_id, m.layout) for m in reply.manifests}


def _read_all(address: str, prefix_id: str, layout: str) -> tuple[bytes, dict[str, list[bytes]]]:
    """Metadata and every record of every region, as stored on ``address``."""
    with grpc.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        manifest = stub.GetManifest(pb.GetManifestRequest(prefix_id=prefix_id, layout=layout), timeout=10).manifest
        requests = [pb.FetchRequest(open=pb.FetchOpen(prefix_id=prefix_id, layout=layout))] + [
            pb.FetchRequest(read=pb.FetchRead(tag=t + 1, region=r.name, indices=range(r.num_records)))
            for t, r in enumerate(manifest.regions)]
        records: dict[str, list[bytes]] = {r.name: [] for r in manifest.regions}
        sizes = {r.name: r.record_size for r in manifest.regions}
        for m in stub.Fetch(iter(requests), timeout=30):
            assert not m.error_code, m.error_message
            size = sizes[m.region]
            records[m.region] += [m.data[i * size : (i + 1) * size] for i in range(len(m.indices))]
    return manifest.metadata, records


def _rebalance(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    assert cli.main(["rebalance", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_adding_a_shard_copies_what_it_owns_then_delete_and_drain(
        shards: list[CacheProc], capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c = (s.address for s in shards)
    # twelve prefixes, six that the new shard takes a copy of and six that stay: which do depends on
    # the shards' ports, and twelve fixed ids all moved in about one run of 130
    candidates = [f"{i:02x}" * 16 for i in range(64)]
    movers = {ch.key for ch in placement_changes(candidates, [a, b], [a, b, c], 2)}
    ids = [p for p in candidates if p in movers][:6] + [p for p in candidates if p not in movers][:6]
    objects = [(pid, LAYOUTS[0], 3 + i % 4) for i, pid in enumerate(ids)] + [(pid, LAYOUTS[1], 2) for pid in ids[:4]]
    asyncio.run(_store([a, b], objects))
    assert _objects(a) == _objects(b) == {(p, l) for p, l, _ in objects}

    moved = {ch.key for ch in placement_changes(ids, [a, b], [a, b, c], 2)}
    assert moved and len(moved) < len(ids)
    expected_copies = sorted((p, l) for p, l, _ in objects if p in moved)

    plan = _rebalance(capsys, "--cache", f"{a},{b},{c}", "--dry-run")
    assert sorted((x["prefix_id"], x["layout"]) for x in plan["planned_copies"]) == expected_copies  # type: ignore[union-attr]
    assert all(x["target"] == c for x in plan["planned_copies"])  # type: ignore[union-attr]
    assert _objects(c) == set()  # a dry run changes nothing
    assert cli.main(["rebalance", "--cache", f"{a},{b},{c}", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.count(f" -> {c}\n") == len(expected_copies) and "(dry run)" in out.err

    done = _rebalance(capsys, "--cache", f"{a},{b},{c}")
    assert done["copied"] == len(expected_copies) and done["failed"] == [] and done["deleted"] == 0
    assert _objects(c) == set(expected_copies)
    for prefix_id, layout in expected_copies:  # the copy is the object, byte for byte
        assert _read_all(c, prefix_id, layout) == _read_all(a, prefix_id, layout)

    cleaned = _rebalance(capsys, "--cache", f"{a},{b},{c}", "--delete")
    assert cleaned["copied"] == 0 and cleaned["deleted"] == len(expected_copies)
    for prefix_id, layout, _ in objects:
        on = {s for s in (a, b, c) if (prefix_id, layout) in _objects(s)}
        assert on == set(replica_set(prefix_id, [a, b, c], 2))
    again = _rebalance(capsys, "--cache", f"{a},{b},{c}", "--delete")
    assert again["planned_copies"] == [] and again["planned_deletes"] == []
    assert again["in_place"] == len(objects)

    # b leaves: everything it held goes to a and c (the only two shards left), then b is empty
    drained = _rebalance(capsys, "--cache", f"{a},{c}", "--drain", b, "--delete")
    assert drained["failed"] == [] and _objects(b) == set()
    assert _objects(a) == _objects(c) == {(p, l) for p, l, _ in objects}


def test_an_unreachable_shard_stops_it_before_anything_is_done(
        shards: list[CacheProc], capsys: pytest.CaptureFixture[str]) -> None:
    a = shards[0].address
    shards[2].stop()
    assert cli.main(["rebalance", "--cache", f"{a},{shards[2].address}"]) == 1
    assert shards[2].address in capsys.readouterr().err


def test_rebalance_runs_without_torch() -> None:
    """The storage image has no torch: `python -m contiguouskv.rebalance` must not import it."""
    code = ("import sys; import contiguouskv.rebalance as r; assert 'torch' not in sys.modules, 'torch'; "
            "raise SystemExit(r.main(['--help']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--drain" in done.stdout
