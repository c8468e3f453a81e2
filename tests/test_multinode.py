"""Three cache shards and two compute servers as separate processes on loopback (issue 7, item 2).

Each cache server sits behind a small TCP forwarder in this process, and the compute servers list
the forwarders as their shards. The forwarder is how the test kills a shard *in the middle of a
Fetch stream* without racing it: armed with a byte count, it forwards that many more response bytes
from the shard, then SIGKILLs the shard's process and drops every connection, so the compute
server sees its stream break part way through the records (the prefix's K/V is 4 MB, the cut is
at 2.5 MiB). A restarted shard comes back behind the same forwarder, i.e. at the same address.

Checked: 20 prefixes each on exactly R=2 shards, their rendezvous replicas, every shard holding
some; every Re-Prefill answers as before the kill (same token, same logits, `return_logits`) from
both compute servers; the broken stream's request completes with no record fetched twice;
registration needs both replicas (the default write quorum of R=2) and names the dead shard when
one is down; the restarted shard lost nothing it had committed. Last, the forwarder goes silent
mid-stream instead (a partition: nothing passes, no connection closes) and the request still
completes, on the other replica, once gRPC's ping timeout (10 s) has closed the connection.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from contiguouskv import launch
from contiguouskv.client import NO_RETRY, ContiguousKVClient, ReprefillResult, UnavailableError
from contiguouskv.compute_server.cachenet.cache_client import DOWN_S
from contiguouskv.compute_server.core import prefix_id_for
from contiguouskv.common.placement import replica_set
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc

MODEL = "random:tiny"  # 4 layers, 2 KV heads x 16, float32: 4 KiB per 16-token kv record
LAYOUT = "contiguous-c16-g8"
BIG_TOKENS = 4000  # 250 chunks x 4 layers x 4 KiB = 4 MB of kv records
CUT_BYTES = 5 << 19  # 2.5 MiB: two whole 1 MiB Fetch responses, then the cut


class Forwarder:
    """TCP forwarder 127.0.0.1:<port> -> a cache server; :meth:`arm` kills the shard part way."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._budget: int | None = None
        self._action: Callable[[], None] | None = None
        self.tripped = threading.Event()
        self.forwarded = 0  # bytes from the shard, all connections
        self._silent = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after_bytes: int, action: Callable[[], None] | None) -> None:
        """After ``after_bytes`` more bytes from the shard: run ``action`` and drop every connection,
        or with no action go silent: connections stay open and nothing passes (a partition)."""
        with self._lock:
            self._budget, self._action = after_bytes, action
            self.tripped.clear()

    def thaw(self) -> None:
        """End the silence: drop the connections it held."""
        with self._lock:
            self._silent = False
            self._drop_locked()

    def close(self) -> None:
        self._listener.close()
        self._drop()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=2)
                upstream.settimeout(None)
            except OSError:  # the shard is down: the connection closes at once
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_shard: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_shard:
                    with self._lock:
                        if self._budget is not None and len(data) >= self._budget:
                            dst.sendall(data[: self._budget])
                            self._budget = None
                            self.tripped.set()
                            if self._action is None:
                                self._silent = True
                                continue
                            self._action()
                            self._drop_locked()
                            return
                        if self._budget is not None:
                            self._budget -= len(data)
                        self.forwarded += len(data)
                if self._silent:
                    continue  # swallowed, in both directions: no FIN, no RST, no ping answered
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self) -> None:
        with self._lock:
            self._drop_locked()

    def _drop_locked(self) -> None:
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._sockets.clear()


class Shard:
    """One cache server process on a fixed root, behind a forwarder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = launch.cache_server(root)
        self.forwarder: Forwarder | None = None

    def ready(self) -> "Shard":
        self.proc.wait_ready()
        if self.forwarder is None:
            self.forwarder = Forwarder(self.proc.address)
        self.forwarder.target = self.proc.address
        return self

    @property
    def address(self) -> str:
        """The address the compute servers know the shard by."""
        assert self.forwarder is not None
        return self.forwarder.address

    def kill(self) -> None:
        self.proc.proc.kill()
        self.proc.proc.wait()

    def restart(self) -> None:
        self.proc.stop()
        self.proc = launch.cache_server(self.root)
        self.ready()

    def objects(self) -> set[tuple[str, str]]:
        with grpc.insecure_channel(self.proc.address) as channel:
            reply = cache_pb2_grpc.CacheServiceStub(channel).ListPrefixes(cache_pb2.ListPrefixesRequest(), timeout=10)
        return {(m.prefix_id, m.layout) for m in reply.manifests}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Shard], list[launch.ServiceProcess]]]:
    tmp = tmp_path_factory.mktemp("multinode")
    shards = [Shard(tmp / f"store-{i}") for i in range(3)]
    computes: list[launch.ServiceProcess] = []
    try:
        for shard in shards:
            shard.ready()
        addresses = ",".join(s.address for s in shards)
        computes = [launch.compute_server(MODEL, addresses, "--device", "cpu", "--dtype", "float32",
                                          log_path=tmp / f"compute-{name}.log") for name in "ab"]
        for proc in computes:
            proc.wait_ready()
        yield shards, computes
    finally:
        for proc in computes:
            proc.stop()
        for shard in shards:
            shard.proc.stop()
            if shard.forwarder is not None:
                shard.forwarder.close()


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def _resent_records(compute: launch.ServiceProcess, shard: str) -> int:
    """Records the compute server asked the next replica for when its stream from ``shard`` broke."""
    log = compute.log_path.read_text()
    found = re.findall(rf"fetch stream from {re.escape(shard)} broke .*: \d+ unfinished reads \((\d+) records\)", log)
    assert found, log[-3000:]
    return int(found[-1])


def _same(a: ReprefillResult, b: ReprefillResult) -> None:
    assert a.token_id == b.token_id
    la, lb = torch.tensor(a.logits), torch.tensor(b.logits)
    assert la.shape == lb.shape and la.numel() > 0
    assert float((la - lb).abs().max()) <= 1e-5 * float(la.abs().max())


def test_three_shards_two_compute_servers_survive_a_lost_shard(
        cluster: tuple[list[Shard], list[launch.ServiceProcess]]) -> None:
    shards, computes = cluster
    by_address = {s.address: s for s in shards}
    addresses = list(by_address)
    clients = [ContiguousKVClient(p.address, timeout=120, retry=NO_RETRY) for p in computes]
    try:
        fingerprint = clients[0].model_info().fingerprint
        # --- register 20 prefixes through both compute servers; the last one is big ------------
        prefixes = [_ids(40 + 13 * i, seed=i) for i in range(19)] + [_ids(BIG_TOKENS, seed=99)]
        ids = []
        for i, tokens in enumerate(prefixes):
            reg = clients[i % 2].register(token_ids=tokens)
            assert reg.prefix_id == prefix_id_for(fingerprint, tokens) and not reg.already_registered
            ids.append(reg.prefix_id)
        assert clients[1].register(token_ids=prefixes[0]).already_registered

        # --- spread: each prefix on exactly its two rendezvous replicas, every shard holds some --
        held = {s.address: s.objects() for s in shards}
        for pid in ids:
            on = {a for a, objs in held.items() if (pid, LAYOUT) in objs}
            assert on == set(replica_set(pid, addresses, 2)), pid
        assert all(len(objs) >= 3 for objs in held.values()), {a: len(o) for a, o in held.items()}
        assert sum(len(objs) for objs in held.values()) == 2 * len(ids)

        # --- answers before any failure ------------------------------------------------------------
        queries = [_ids(8, seed=1000 + i) for i in range(len(ids))]
        before = [clients[0].reprefill(pid, q, policy="full", return_logits=True) for pid, q in zip(ids, queries)]
        big, big_query = ids[-1], queries[-1]
        before_contiguous = clients[1].reprefill(big, big_query, policy="contiguous", budget=0.5, return_logits=True)
        full_bytes = before[-1].bytes_fetched
        assert full_bytes == 4 * 250 * 4096

        # --- SIGKILL the big prefix's first replica in the middle of its Fetch stream -------------
        victim = by_address[replica_set(big, addresses, 2)[0]]
        assert victim.forwarder is not None
        victim.forwarder.arm(CUT_BYTES, victim.kill)
        during = clients[0].reprefill(big, big_query, policy="full", return_logits=True)
        assert victim.forwarder.tripped.is_set() and victim.proc.proc.returncode == -9
        _same(before[-1], during)
        assert during.bytes_fetched == full_bytes  # records already received were not fetched again
        resent = _resent_records(computes[0], victim.address)
        assert 0 < resent < 1000, resent  # some of the 1000 records had arrived, the rest came from the other replica

        # --- with the shard dead, every prefix still answers, from both compute servers ------------
        for i, (pid, query) in enumerate(zip(ids, queries)):
            _same(before[i], clients[i % 2].reprefill(pid, query, policy="full", return_logits=True))
            _same(before[i], clients[(i + 1) % 2].reprefill(pid, query, policy="full", return_logits=True))
        _same(before_contiguous, clients[0].reprefill(big, big_query, policy="contiguous", budget=0.5,
                                                      return_logits=True))

        # --- registering needs both replicas: the dead shard is named -----------------------------
        new = [_ids(50, seed=s) for s in range(500, 560)]
        on_victim = [t for t in new if victim.address in replica_set(prefix_id_for(fingerprint, t), addresses, 2)]
        elsewhere = [t for t in new if t not in on_victim]
        with pytest.raises(UnavailableError) as info:
            clients[0].register(token_ids=on_victim[0])
        assert victim.address in str(info.value) and "write quorum is 2" in str(info.value)
        assert not clients[1].register(token_ids=elsewhere[0]).already_registered
        # the live replica finishes that write in the background; trying again must not pass for
        # stored while fewer than the quorum hold it
        short = prefix_id_for(fingerprint, on_victim[0])
        live = by_address[next(a for a in replica_set(short, addresses, 2) if a != victim.address)]
        deadline = time.monotonic() + 10
        while (short, LAYOUT) not in live.objects() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (short, LAYOUT) in live.objects()
        with pytest.raises(UnavailableError, match="write quorum is 2"):
            clients[1].register(token_ids=on_victim[0])

        # --- restart on the same root: nothing it had committed is lost -----------------------------
        victim.restart()
        assert victim.objects() == held[victim.address]
        time.sleep(DOWN_S + 0.5)  # the compute servers try it first again
        for _ in range(10):  # until the second compute server reads the big prefix from it again
            start = victim.forwarder.forwarded
            _same(before[-1], clients[1].reprefill(big, big_query, policy="full", return_logits=True))
            if victim.forwarder.forwarded - start >= full_bytes:
                break
            time.sleep(1.0)
        else:
            raise AssertionError("the restarted shard is not read from")

        # --- a partition mid-stream (the shard goes silent: no FIN, no RST), through the other ------
        # compute server, with a selective policy: gRPC's ping timeout (10 s) breaks the stream
        victim.forwarder.arm(CUT_BYTES // 2, None)
        start = time.monotonic()
        _same(before_contiguous, clients[1].reprefill(big, big_query, policy="contiguous", budget=0.5,
                                                      return_logits=True))
        assert victim.forwarder.tripped.is_set() and time.monotonic() - start < 40
        assert _resent_records(computes[1], victim.address) > 0
        victim.forwarder.thaw()
        assert victim.objects() == held[victim.address]
        # registered while it was down: on its two replicas; the failed registration left one copy
        # (on the live replica), which a retry or `contiguouskv rebalance` completes
        objects = [s.objects() for s in shards]
        assert sum((prefix_id_for(fingerprint, elsewhere[0]), LAYOUT) in o for o in objects) == 2
        assert sum((prefix_id_for(fingerprint, on_victim[0]), LAYOUT) in o for o in objects) == 1
        assert not clients[0].register(token_ids=on_victim[0]).already_registered  # completes it
        assert sum((prefix_id_for(fingerprint, on_victim[0]), LAYOUT) in s.objects() for s in shards) == 2
    except BaseException:
        for proc in computes:  # shown by pytest with the failure
            print(f"--- {proc.log_path.name}\n{proc.log_tail(60)}")
        raise
    finally:
        for client in clients:
            client.close()
