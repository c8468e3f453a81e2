"""Fault injection with real processes (issue 8, item 4): SIGKILL, restarts, damaged data files.

One cache server (no DRAM cache, so every read goes to disk) sits behind the TCP forwarder of
``test_multinode``; three compute servers (``random:tiny``, one torch thread) use it as their only
shard (replication 1). In order:

- a compute server SIGKILLed while a Re-Prefill runs on it (the cache server has opened the
  request's Fetch stream, and 512 tokens are still to be generated): a client without retries gets
  ``UnavailableError``; the SDK with its default retry and two addresses, whose call was running on
  the killed server, answers from the other one with the same token, tokens and logits as before;
  a Generate through the dead server and the live one streams the same tokens;
- the one cache shard SIGKILLed mid-Fetch (after 1.5 MiB of a 3 MB prefix): the Re-Prefill fails
  with ``UnavailableError``, never with a token; restarted on the same root, the same request gives
  the same answer (what ``test_multinode`` misses: with replication 2 the request never fails);
- data files damaged under the running cache server: one prefix's file truncated, another's
  overwritten in the middle. Fetch of those records gets DATA_LOSS in-band naming the object, and
  Re-Prefill of those prefixes ``DataLossError``; the records before the damage and every record
  of an untouched prefix read back the same, its Re-Prefill answers as before, the server runs on;
- a real EIO from the kernel: the victim's data file swapped for a FUSE file (``faulty_fuse.py``)
  whose second half fails every read, under the running server (needs root and /dev/fuse);
- a read that fails with an OSError gives a message that names the object (plain reader).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contiguouskv import launch
from contiguouskv.cache_server.errors import CacheError
from contiguouskv.cache_server.manifest import Manifest, plan_regions
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.reader import ObjectReader
from contiguouskv.cache_server.stats import Counters
from contiguouskv.client import (
    NO_RETRY, ContiguousKVClient, DataLossError, ReprefillResult, UnavailableError,
)
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc
import faulty_fuse
from test_multinode import Forwarder

MODEL = "random:tiny"  # 4 layers, 2 KV heads x 16, float32: 4 KiB per 16-token kv record
LAYOUT = "contiguous-c16-g8"
BIG_TOKENS = 3000  # 188 chunks x 4 layers x 4 KiB: 3 MB of kv records
NEW_TOKENS = 512  # the compute server's limit: keeps a request running for a while
CUT_BYTES = 3 << 19  # 1.5 MiB into the Fetch stream
DAMAGE_AT = 64 << 10  # offset in a data file of a 200-token prefix, inside its kv records
DATA_LOSS = grpc.StatusCode.DATA_LOSS.value[0]
COMPUTE_ARGS = ("--device", "cpu", "--dtype", "float32", "--threads", "1")
CACHE_ARGS = ("--dram-cache-bytes", "0")


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def _same(a: ReprefillResult, b: ReprefillResult) -> None:
    assert (a.token_id, a.generated_ids) == (b.token_id, b.generated_ids)
    assert a.logits == b.logits and len(a.logits) == 512


@dataclasses.dataclass
class Cluster:
    root: Path
    cache: launch.ServiceProcess
    forwarder: Forwarder
    computes: dict[str, launch.ServiceProcess]  # "a1", "a2" (victims) and "b"
    big: str  # prefix id of the 3000-token prefix
    query: list[int]
    before: ReprefillResult  # its answer with NEW_TOKENS more tokens

    def cache_stats(self) -> cache_pb2.GetStatsResponse:
        with grpc.insecure_channel(self.cache.address) as channel:
            return cache_pb2_grpc.CacheServiceStub(channel).GetStats(cache_pb2.GetStatsRequest(), timeout=10)

    def restart_cache(self) -> None:
        self.cache.stop()
        self.cache = launch.cache_server(self.root, *CACHE_ARGS)
        self.forwarder.target = self.cache.wait_ready()

    def client(self, *names: str, retry: bool = False) -> ContiguousKVClient:
        addresses = [self.computes[n].address for n in names]
        return ContiguousKVClient(addresses, timeout=120) if retry else \
            ContiguousKVClient(addresses, timeout=120, retry=NO_RETRY)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("faults")
    cache = launch.cache_server(tmp / "store", *CACHE_ARGS)
    computes: dict[str, launch.ServiceProcess] = {}
    forwarder = Forwarder(cache.wait_ready())
    try:
        computes = {name: launch.compute_server(MODEL, forwarder.address, *COMPUTE_ARGS,
                                                log_path=tmp / f"compute-{name}.log") for name in ("a1", "a2", "b")}
        for proc in computes.values():
            proc.wait_ready()
        query = _ids(8, seed=2)
        with ContiguousKVClient(computes["b"].address, timeout=120) as b:
            big = b.register(token_ids=_ids(BIG_TOKENS, seed=1)).prefix_id
            before = b.reprefill(big, query, max_new_tokens=NEW_TOKENS, return_logits=True)
        cluster = Cluster(tmp / "store", cache, forwarder, computes, big, query, before)
        yield cluster
    finally:
        for proc in computes.values():
            proc.stop()
        cluster.cache.stop() if "cluster" in locals() else cache.stop()
        forwarder.close()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _kill_once_streaming(cluster: Cluster, victim: launch.ServiceProcess, call: "concurrent.futures.Future[object]",
                         streams_before: int) -> None:
    """SIGKILL ``victim`` as soon as the cache server has opened a Fetch stream for ``call``."""
    while cluster.cache_stats().fetch_streams_total == streams_before:
        assert not call.done(), "the call ended before it fetched anything"
        time.sleep(0.005)
    victim.proc.kill()
    victim.proc.wait()


def test_compute_killed_mid_request(cluster: Cluster) -> None:
    a1, a2 = cluster.computes["a1"], cluster.computes["a2"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # no retries: the caller sees UNAVAILABLE
        with cluster.client("a1") as client:
            streams = cluster.cache_stats().fetch_streams_total
            call = pool.submit(client.reprefill, cluster.big, cluster.query, max_new_tokens=NEW_TOKENS)
            _kill_once_streaming(cluster, a1, call, streams)
            with pytest.raises(UnavailableError):
                call.result()
        # the default retry over two servers: the call running on the killed one completes on the other
        with cluster.client("a2", "b", retry=True) as client:
            streams = cluster.cache_stats().fetch_streams_total
            call = pool.submit(client.reprefill, cluster.big, cluster.query, max_new_tokens=NEW_TOKENS,
                               return_logits=True)
            _kill_once_streaming(cluster, a2, call, streams)
            _same(cluster.before, call.result())
    for victim in (a1, a2):  # neither finished a Re-Prefill: both were killed in the middle of it
        assert victim.proc.returncode == -9
        assert f"reprefill {cluster.big}" not in victim.log_path.read_text()
    with cluster.client("a1", "b", retry=True) as client:  # before its first token: retried on b
        tokens = [t.token_id for t in client.generate(cluster.big, cluster.query, max_new_tokens=NEW_TOKENS)]
    assert tokens == [cluster.before.token_id, *cluster.before.generated_ids]
    assert _serving(cluster.cache.address) and _serving(cluster.computes["b"].address)


def test_only_cache_shard_killed_mid_stream(cluster: Cluster) -> None:
    """Replication 1: the request fails cleanly, and after a restart answers as before."""
    victim = cluster.cache
    cluster.forwarder.arm(CUT_BYTES, lambda: (victim.proc.kill(), victim.proc.wait()))
    with cluster.client("b") as client:
        with pytest.raises(UnavailableError) as info:
            client.reprefill(cluster.big, cluster.query, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert cluster.forwarder.tripped.is_set() and victim.proc.returncode == -9
        assert "cache server" in info.value.details
        cluster.restart_cache()
        for _ in range(100):  # until the compute server tries the shard again (5 s after the failure)
            try:
                after = client.reprefill(cluster.big, cluster.query, max_new_tokens=NEW_TOKENS, return_logits=True)
                break
            except UnavailableError:
                time.sleep(0.2)
        else:
            raise AssertionError("the restarted shard is not read from")
    _same(cluster.before, after)


# -- damaged data files ------------------------------------------------------------------------

def _read_all(address: str, prefix_id: str, layout: str = LAYOUT,
              reads: dict[str, range] | None = None) -> dict[str, list[cache_pb2.FetchResponse]]:
    """Records of an object (``reads``: region -> indices; default all), one read per region;
    responses by region (errors in-band)."""
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        if reads is None:
            manifest = stub.GetManifest(cache_pb2.GetManifestRequest(prefix_id=prefix_id, layout=layout), timeout=30)
            reads = {r.name: range(r.num_records) for r in manifest.manifest.regions}
        requests = [cache_pb2.FetchRequest(open=cache_pb2.FetchOpen(prefix_id=prefix_id, layout=layout))]
        requests += [cache_pb2.FetchRequest(read=cache_pb2.FetchRead(tag=i, region=region, indices=indices))
                     for i, (region, indices) in enumerate(reads.items())]
        out: dict[str, list[cache_pb2.FetchResponse]] = {region: [] for region in reads}
        for response in stub.Fetch(iter(requests), timeout=30):
            out[response.region].append(response)
        return out


def _records(responses: dict[str, list[cache_pb2.FetchResponse]]) -> dict[tuple[str, int], bytes]:
    """(region, index) -> payload of every record served."""
    out = {}
    for region, batch in responses.items():
        for r in batch:
            size = len(r.data) // max(1, len(r.indices))
            out.update({(region, i): r.data[k * size:(k + 1) * size] for k, i in enumerate(r.indices)})
    return out


def _errors(responses: dict[str, list[cache_pb2.FetchResponse]]) -> list[tuple[int, str]]:
    return [(r.error_code, r.error_message) for batch in responses.values() for r in batch if r.error_code]


def test_damaged_data_files_under_a_running_server(cluster: Cluster) -> None:
    address = cluster.cache.address
    with cluster.client("b") as client:
        ids = {name: client.register(token_ids=_ids(200, seed=10 + i)).prefix_id
               for i, name in enumerate(("truncated", "overwritten", "intact"))}
        before = {name: client.reprefill(pid, cluster.query, return_logits=True) for name, pid in ids.items()}
        stored = {name: _records(_read_all(address, pid)) for name, pid in ids.items()}
        files = {name: cluster.root / "objects" / pid / f"{LAYOUT}.data" for name, pid in ids.items()}
        # the file starts with the kv records (13 chunks x 4 layers x 4 KiB): damage them at 64 KiB
        os.truncate(files["truncated"], DAMAGE_AT)
        with open(files["overwritten"], "r+b") as f:  # 8 KiB, every bit flipped
            f.seek(DAMAGE_AT)
            flipped = bytes(b ^ 0xFF for b in f.read(8192))
            f.seek(DAMAGE_AT)
            f.write(flipped)
        failures = cluster.cache_stats().checksum_failures

        for name, words in (("truncated", f"{LAYOUT} ends at"), ("overwritten", "checksum mismatch")):
            got = _read_all(address, ids[name])
            errors = _errors(got)
            assert errors and all(code == DATA_LOSS and ids[name] in message for code, message in errors), errors
            assert any(words in message for _, message in errors), errors
            served = _records(got)  # a batch that holds a damaged record is not served at all
            assert all(stored[name][k] == v for k, v in served.items()) and len(served) < len(stored[name])
            head = _records(_read_all(address, ids[name], reads={"kv/G0": range(16)}))  # before 64 KiB
            assert head == {k: v for k, v in stored[name].items() if k[0] == "kv/G0" and k[1] < 16}
            with pytest.raises(DataLossError):
                client.reprefill(ids[name], cluster.query, return_logits=True)
        assert cluster.cache_stats().checksum_failures > failures
        assert "Fetch read failed: DataLoss checksum mismatch" in cluster.cache.log_tail(400)  # the operator's line

        got = _read_all(address, ids["intact"])
        assert not _errors(got) and _records(got) == stored["intact"]
        _same(before["intact"], client.reprefill(ids["intact"], cluster.query, return_logits=True))
    assert cluster.cache.proc.poll() is None and _serving(address)


def test_eio_from_the_disk(tmp_path: Path) -> None:
    """A data file whose second half fails every read with EIO (served through FUSE, read with
    O_DIRECT by the running server): INTERNAL naming the object for the failing records, the right
    bytes for the others and for another prefix, and the server serving on."""
    reason = faulty_fuse.unavailable()
    if reason:
        pytest.skip(reason)
    rng = random.Random(5)
    payload = {name: [rng.randbytes(4096) for _ in range(64)] for name in ("victim", "keeper")}
    cache = launch.cache_server(tmp_path / "root", *CACHE_ARGS)
    try:
        address = cache.wait_ready()
        with grpc.insecure_channel(address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            for prefix, records in payload.items():
                stub.PutPrefix(iter([
                    cache_pb2.PutPrefixRequest(header=cache_pb2.PutPrefixHeader(
                        prefix_id=prefix, layout="l", regions=[cache_pb2.RegionSpec(
                            name="a", num_records=len(records), record_size=4096)])),
                    cache_pb2.PutPrefixRequest(data=cache_pb2.PutPrefixData(region="a", data=b"".join(records))),
                    cache_pb2.PutPrefixRequest(commit=cache_pb2.PutPrefixCommit())]), timeout=30)
        data_file = tmp_path / "root" / "objects" / "victim" / "l.data"
        content = data_file.read_bytes()
        (tmp_path / "mnt").mkdir()
        with faulty_fuse.FaultyFile(tmp_path / "mnt", content, range(len(content) // 2, len(content))) as disk:
            link = data_file.with_name("l.data.link")
            link.symlink_to(disk.path)
            os.replace(link, data_file)  # the server opens the data file per Fetch stream
            failing = _read_all(address, "victim", "l", {"a": range(48, 64)})  # in the second half
            assert disk.failed_reads > 0
            errors = _errors(failing)
            assert errors and all(code == grpc.StatusCode.INTERNAL.value[0] for code, _ in errors), errors
            assert all("victim" in message and "Input/output error" in message for _, message in errors), errors
            assert not _records(failing)
            good = _records(_read_all(address, "victim", "l", {"a": range(0, 16)}))  # in the first half
            assert good == {("a", i): payload["victim"][i] for i in range(16)}
            keeper = _records(_read_all(address, "keeper", "l"))
            assert keeper == {("a", i): r for i, r in enumerate(payload["keeper"])}
            assert cache.proc.poll() is None and _serving(address)
    finally:
        cache.stop()


def test_read_error_names_the_object(tmp_path: Path) -> None:
    """An OSError from a read (here EISDIR; EIO above) becomes a CacheError naming the object."""
    layouts = plan_regions([("a", 2, 4096)], max_record_bytes=1 << 20)
    manifest = Manifest(ObjectKey("p-1", "l"), layouts, {"a": b"\0" * 8}, b"", 0.0)
    fd = os.open(tmp_path, os.O_RDONLY)
    with ObjectReader(manifest, fd, False, Counters()) as reader:
        with pytest.raises(CacheError) as info:
            reader.read("a", [0, 1])
    assert "p-1/l" in str(info.value) and info.value.code == grpc.StatusCode.INTERNAL.value[0]
