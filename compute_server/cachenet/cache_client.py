"""The compute server's side of the cache wire: manifests, PutPrefix, and Fetch streams.

Owns one grpc.aio channel per cache shard. A prefix lives on the ``R`` shards first in the
rendezvous order of its id over the shard addresses (:mod:`.shards`), so adding a shard moves only
the prefixes it now wins. Writes go to every replica and succeed once the write quorum committed;
reads go to the first live replica and move on to the next (a Fetch stream mid-request too, see
:mod:`.failover`). ``dns:///NAME:PORT`` entries are expanded by :mod:`.discovery` at
:meth:`CacheClient.start` and every ``refresh_s`` after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from contiguouskv.common.fetch_wire import BULK_RECEIVE_OPTIONS, FetchBatch, decode_fetch_response
from contiguouskv.common.security import ClientTls, open_aio_channel
from contiguouskv.common import discovery
from contiguouskv.compute_server.errors import ComputeError, Unavailable
from contiguouskv.compute_server.cachenet.attention import RegionScores
from contiguouskv.compute_server.cachenet.failover import ReplicaStream
from contiguouskv.compute_server.cachenet.multistream import MultiStream
from contiguouskv.compute_server.cachenet.record_stream import RecordStream, cache_error
from contiguouskv.compute_server.cachenet.shm_plane import ShmPlane
from contiguouskv.compute_server.layouts.region import Region
from contiguouskv.common.placement import (
    effective_replication, effective_write_quorum, rendezvous_order, replica_set,
)
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc

FETCH_METHOD = "/contiguouskv.v1.CacheService/Fetch"
DOWN_S = 5.0
"""After a shard fails with UNAVAILABLE, reads try its replicas first for this long (and a shard that
went silent is not called for this long unless it answers a probe)."""
PROBE_TIMEOUT_S = 2.0  # a silent shard's probe: it answers at once when it is back
# A restarted shard is dialled again within seconds, not after gRPC's default backoff (up to 120 s).
# A ping unanswered for 10 s closes the connection: a shard whose node vanished without closing it
# (power loss, partition) then fails its calls with UNAVAILABLE and a Fetch stream fails over within
# seconds (measured: 10 s), not at the call's deadline. Pings: gRPC's own flow-control probes while
# data flows (their timeout is 60 s by default) and keepalive pings every 10 s during a call; the
# cache server accepts pings that often (common.serving.server_options).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
                     ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 10_000),
                     ("grpc.http2.ping_timeout_ms", 10_000), ("grpc.http2.max_pings_without_data", 0)]

log = logging.getLogger(__name__)

REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "FAILED_PRECONDITION"})
"""A shard's answers to a write that no retry changes: passed on with their code, not as UNAVAILABLE."""


class CacheClient:
    """Async access to the cache shards; created and closed on the server's event loop.

    ``replication`` (0: 2 where there are at least two shards, else 1) and ``write_quorum``
    (0: a majority of the replicas) are capped at the number of shards known at the time.
    ``tls`` and ``token``: how every shard is reached (TLS, mutual with a client certificate; a
    bearer token, which needs TLS unless the shard is on loopback).
    """

    def __init__(self, addresses: Sequence[str], max_message_bytes: int, timeout_s: float,
                 replication: int = 0, write_quorum: int = 0, refresh_s: float = 30.0, *,
                 tls: ClientTls | None = None, token: str | None = None,
                 data_path: str = "grpc", shm_socket: str = "", shm_slots: int = 32,
                 shm_slot_bytes: int = 4 << 20) -> None:
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes), *RECONNECT_OPTIONS,
                         *BULK_RECEIVE_OPTIONS]
        self._tls, self._token = tls, token
        self._entries = list(addresses)
        self._addresses = [a for a in self._entries if not discovery.is_dns(a)]
        self._resolved: dict[str, list[str]] = {}  # dns:/// entry -> its last non-empty expansion
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, cache_pb2_grpc.CacheServiceStub] = {}
        self._timeout = timeout_s
        self._replication = replication
        self._write_quorum = write_quorum
        self._refresh_s = refresh_s
        self._down_until: dict[str, float] = {}
        self._silent: dict[str, tuple[float, str]] = {}  # shard -> (when it went silent, how it failed)
        self._probing: set[str] = set()  # silent shards with a probe in flight
        self._background: set[asyncio.Task[object]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._data_path = data_path if shm_socket else "grpc"
        self._shm = (shm_socket, shm_slots, shm_slot_bytes)
        self._plane: ShmPlane | None = None
        self._plane_retry_at = 0.0
        self._plane_lock = asyncio.Lock()

    # --- shards ----------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """The shards placement is computed over now."""
        return list(self._addresses)

    @property
    def replication(self) -> int:
        return effective_replication(self._replication, len(self._addresses))

    @property
    def write_quorum(self) -> int:
        return effective_write_quorum(self._write_quorum, self.replication)

    async def start(self) -> None:
        """Resolve ``dns:///`` entries now and every ``refresh_s`` seconds after (if there are any)."""
        if any(discovery.is_dns(e) for e in self._entries):
            await self.refresh()
            self._refresher = asyncio.create_task(self._refresh_loop())
        log.info("cache shards: %s; replication %d, write quorum %d", ",".join(self._addresses) or "none yet",
                 self.replication, self.write_quorum)

    async def refresh(self) -> None:
        """Resolve the ``dns:///`` entries again; one that resolves to nothing keeps its last answer."""
        loop = asyncio.get_running_loop()
        for entry in self._entries:
            if discovery.is_dns(entry):
                found = await loop.run_in_executor(None, discovery.expand, [entry])
                if found:
                    self._resolved[entry] = found
                else:
                    log.warning("cache shards: %s resolved to no address; keeping %s", entry,
                                ",".join(self._resolved.get(entry, [])) or "none")
        addresses = [a for e in self._entries for a in (self._resolved.get(e, []) if discovery.is_dns(e) else [e])]
        addresses = sorted(set(addresses), key=addresses.index)
        if sorted(addresses) != sorted(self._addresses):
            log.info("cache shards: %s (was %s)", ",".join(addresses) or "none", ",".join(self._addresses) or "none")
            self._addresses = addresses

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a resolver hiccup must not stop the refreshes
                log.exception("cache shards: re-resolving %s failed", ",".join(self._entries))

    def owner(self, prefix_id: str) -> str:
        return self.replicas(prefix_id)[0]

    def replicas(self, prefix_id: str) -> list[str]:
        """The prefix's replica shards in rendezvous order; UNAVAILABLE when no shard is known."""
        if not self._addresses:
            raise Unavailable(f"no cache shard known (configured: {','.join(self._entries)})")
        return replica_set(prefix_id, self._addresses, self.replication)

    def read_order(self, prefix_id: str) -> list[str]:
        """The replicas, those that failed with UNAVAILABLE in the last few seconds last."""
        now = time.monotonic()
        return sorted(self.replicas(prefix_id), key=lambda a: self._down_until.get(a, 0.0) > now)

    def _stub(self, address: str) -> cache_pb2_grpc.CacheServiceStub:
        if address not in self._stubs:
            self._channels[address] = open_aio_channel(address, self._tls, self._token, self._options)
            self._stubs[address] = cache_pb2_grpc.CacheServiceStub(self._channels[address])
        return self._stubs[address]

    def _note(self, address: str, error: ComputeError | None) -> None:
        """Remember a shard as down after UNAVAILABLE, as up after a success; and as silent when it
        failed by not answering at all (a stopped process, a partition)."""
        if error is None:
            self._down_until.pop(address, None)
            self._silent.pop(address, None)
        elif error.code == "UNAVAILABLE":
            now = time.monotonic()
            self._down_until[address] = now + DOWN_S
            if _silence(str(error)) and self._silence_of(address, now) is None:
                self._silent[address] = (now, str(error))

    def _silence_of(self, address: str, now: float) -> str | None:
        """Why ``address`` is not worth a call now: it went silent less than ``DOWN_S`` ago. Each call
        to a silent shard waits for gRPC's ping or connect timeout (10-20 s), and the SDK retries
        UNAVAILABLE: without this a client waited that long at every attempt."""
        silent = self._silent.get(address)
        if silent is None or now - silent[0] >= DOWN_S:
            return None
        return (f"{silent[1]} ({now - silent[0]:.1f} s ago; called again once it answers a probe, "
                f"or {DOWN_S:g} s after)")

    def _silent_error(self, address: str) -> Unavailable | None:
        """UNAVAILABLE for a call not made to a shard that went silent moments ago, else None. A
        probe (GetStats, 2 s) goes out instead, at most one at a time: a shard that answers again
        (a resumed process) is used by the next call, not ``DOWN_S`` later."""
        silence = self._silence_of(address, time.monotonic())
        if silence is None:
            return None
        if address not in self._probing:
            self._probing.add(address)
            task = asyncio.ensure_future(self._probe(address))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return Unavailable(silence if silence.startswith("cache server") else f"cache server {address}: {silence}")

    async def _probe(self, address: str) -> None:
        try:
            await self._stub(address).GetStats(cache_pb2.GetStatsRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return  # still silent (or worse): the mark stands
        finally:
            self._probing.discard(address)
        self._note(address, None)

    # --- calls -----------------------------------------------------------------------------------
    async def get_manifest(self, prefix_id: str, layout: str, everywhere: bool = False) -> cache_pb2.Manifest | None:
        """The committed manifest from the first live replica that holds the object.

        None when every replica answered that it does not hold it. A replica that cannot be
        reached counts as "may hold it": when no reachable replica holds the object but one was
        unreachable, the result is UNAVAILABLE naming it. With ``everywhere`` (registration) the
        manifest is returned only when every reachable replica holds it and they are at least the
        write quorum, else None, so that the object is written again (and a registration does not
        pass for stored while fewer than the quorum hold it: a replica down when it was written).
        """
        found: cache_pb2.Manifest | None = None
        missing, failed = [], []
        holders = 0
        for address in self.read_order(prefix_id):
            if (silent := self._silent_error(address)) is not None:
                failed.append(silent)  # not asked: it may hold the object, as an unreachable one
                continue
            try:
                reply = await self._stub(address).GetManifest(
                    cache_pb2.GetManifestRequest(prefix_id=prefix_id, layout=layout), timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    missing.append(address)
                    if everywhere:
                        return None
                    continue
                error = cache_error(address, err)
                self._note(address, error)
                failed.append(error)
                continue
            self._note(address, None)
            if not everywhere:
                return reply.manifest
            found, holders = reply.manifest, holders + 1
        if everywhere and holders:  # on fewer than the quorum (a replica was down when it was written): again
            return found if holders >= self.write_quorum else None
        if found is not None or not failed:
            return found
        if len(failed) == 1 and not missing:
            raise failed[0]
        raise Unavailable(f"prefix {prefix_id} ({layout}): " + "; ".join(
            [str(e) for e in failed] + [f"cache server {a}: not found" for a in missing]))

    async def put_prefix(self, prefix_id: str, layout: str, regions: Iterable[Region], metadata: bytes,
                         payloads: Iterable[tuple[str, int, memoryview]]) -> cache_pb2.PutPrefixResponse:
        """Store one object on every replica; returns once the write quorum committed it durably.

        Replicas still writing then finish in the background. UNAVAILABLE naming every failed
        shard when fewer than the quorum committed (the object may be on some: a retry is a no-op
        there).
        """
        header = cache_pb2.PutPrefixHeader(
            prefix_id=prefix_id, layout=layout, metadata=metadata,
            regions=[cache_pb2.RegionSpec(name=r.name, num_records=r.num_records, record_size=r.record_size)
                     for r in regions])
        parts = payloads if isinstance(payloads, list) else list(payloads)
        replicas, quorum = self.replicas(prefix_id), self.write_quorum
        tasks = {asyncio.create_task(self._put_at(a, header, parts)): a for a in replicas}
        pending: set[asyncio.Task[cache_pb2.PutPrefixResponse]] = set(tasks)
        replies: list[cache_pb2.PutPrefixResponse] = []
        failed: list[BaseException] = []
        try:
            while pending and len(replies) < quorum and len(replicas) - len(failed) >= quorum:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        replies.append(task.result())
                    else:
                        failed.append(task.exception())  # type: ignore[arg-type]
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            raise
        for task in pending:  # the quorum is decided; the rest complete on their own
            self._background.add(task)
            task.add_done_callback(self._finished_in_background)
        if len(replies) < quorum:
            message = (f"prefix {prefix_id} ({layout}): committed on {len(replies)} of {len(replicas)} replicas "
                       f"(any still writing finish in the background), the write quorum is {quorum}: "
                       + "; ".join(str(e) for e in failed))
            refused = [e for e in failed if isinstance(e, ComputeError) and e.code in REFUSALS]
            if refused:  # a shard said no (full, invalid): a retry cannot succeed, so not UNAVAILABLE
                raise ComputeError(message, code=refused[0].code)
            raise Unavailable(message)
        best = max(replies, key=lambda r: r.bytes_written)
        return cache_pb2.PutPrefixResponse(manifest=best.manifest, bytes_written=best.bytes_written,
                                           already_committed=all(r.already_committed for r in replies))

    async def _put_at(self, address: str, header: cache_pb2.PutPrefixHeader,
                      payloads: list[tuple[str, int, memoryview]]) -> cache_pb2.PutPrefixResponse:
        async def requests() -> AsyncIterator[cache_pb2.PutPrefixRequest]:
            yield cache_pb2.PutPrefixRequest(header=header)
            for region, first, data in payloads:
                yield cache_pb2.PutPrefixRequest(
                    data=cache_pb2.PutPrefixData(region=region, first_record=first, data=bytes(data)))
            yield cache_pb2.PutPrefixRequest(commit=cache_pb2.PutPrefixCommit())

        if (silent := self._silent_error(address)) is not None:
            raise silent
        try:
            reply = await self._stub(address).PutPrefix(requests(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            error = cache_error(address, err)
            self._note(address, error)
            raise error from err
        self._note(address, None)
        return reply

    def _finished_in_background(self, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("replica write after the quorum failed: %s", task.exception())

    async def report_attention(self, prefix_id: str, layout: str, scores: Sequence[RegionScores]) -> None:
        """Send one request's per-record observations to the first live replica; failures are logged, never raised."""
        request = cache_pb2.ReportAttentionRequest(prefix_id=prefix_id, layout=layout, records=[
            cache_pb2.RecordScores(region=s.region, indices=s.indices, attention=s.attention,
                                   important_fraction=s.important_fraction)
            for s in scores])
        try:
            address = self.read_order(prefix_id)[0]
        except ComputeError as err:
            log.debug("attention report not sent: %s", err)
            return
        try:
            await self._stub(address).ReportAttention(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            log.debug("attention report to %s failed: %s %s", address, err.code(), err.details())

    async def open_stream(self, prefix_id: str, layout: str, batch_bytes: int,
                          streams: int = 1) -> ReplicaStream | MultiStream:
        """A Fetch stream on the first live replica that can be opened; fails over when it breaks.

        ``streams`` > 1: that many such streams behind one :class:`MultiStream`, stream ``k``
        reading the replicas in read order rotated by ``k`` (:mod:`.multistream`)."""
        async def connect(address: str) -> RecordStream:
            return await self.open_stream_at(address, prefix_id, layout, batch_bytes)

        if streams > 1:
            return await MultiStream.open(prefix_id, layout, self.read_order(prefix_id), connect, streams,
                                          self._note)
        stream = ReplicaStream(prefix_id, layout, self.read_order(prefix_id), connect, self._note)
        await stream.start()
        return stream

    async def open_stream_at(self, address: str, prefix_id: str, layout: str, batch_bytes: int) -> RecordStream:
        """A Fetch stream on one shard, opened on the object (on the shared-memory plane when there is one).

        A shard that went silent moments ago is not tried: UNAVAILABLE at once (:meth:`_silence_of`)."""
        if (silent := self._silent_error(address)) is not None:
            raise silent
        self._stub(address)
        # Responses are parsed by the cache's raw decoder: ``data`` is a zero-copy memoryview.
        fetch = self._channels[address].stream_stream(
            FETCH_METHOD, request_serializer=cache_pb2.FetchRequest.SerializeToString,
            response_deserializer=decode_fetch_response)
        plane = await self._plane_now()
        stream = RecordStream(address, fetch(timeout=self._timeout), plane.stream() if plane is not None else None)
        try:
            await stream.open(prefix_id, layout, batch_bytes)
        except BaseException:
            await stream.close()
            raise
        return stream

    @property
    def plane(self) -> ShmPlane | None:
        """The shared-memory plane in use now, if any."""
        return self._plane if self._plane is not None and self._plane.alive else None

    async def _plane_now(self) -> ShmPlane | None:
        """The live plane, (re)opened if needed; ``None`` on the byte path. With ``data_path`` auto a
        plane that cannot be opened is tried again after ``DOWN_S``; with ``shm`` it is UNAVAILABLE."""
        if self._data_path == "grpc":
            return None
        async with self._plane_lock:
            if self._plane is not None and self._plane.alive:
                return self._plane
            if self._plane is not None:
                self._plane.close()
                self._plane = None
            if self._data_path == "auto" and time.monotonic() < self._plane_retry_at:
                return None
            path, slots, slot_bytes = self._shm
            try:
                self._plane = await asyncio.get_running_loop().run_in_executor(
                    None, ShmPlane.connect, path, slots, slot_bytes)
            except (OSError, ValueError) as exc:
                self._plane_retry_at = time.monotonic() + DOWN_S
                if self._data_path == "shm":
                    raise Unavailable(f"shared-memory plane {path}: {exc}") from exc
                log.info("shared-memory plane %s not available (%s); records come over gRPC", path, exc)
                return None
            return self._plane

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
        if self._plane is not None:
            self._plane.close()


# How gRPC words a shard that does not answer at all (as opposed to one that refuses the connection)
_SILENCE = ("ping timeout", "keepalive watchdog timeout", "timed out before receiving settings")


def _silence(message: str) -> bool:
    lowered = message.lower()
    return any(phrase in lowered for phrase in _SILENCE)
