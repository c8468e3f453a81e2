"""The compute server's side of the cache wire: manifests, PutPrefix, and Fetch streams.

Owns one grpc.aio channel per cache shard. A prefix lives on the shard chosen by rendezvous hashing
of its id over the configured addresses, so adding a shard moves only the prefixes it now wins.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from contiguouskv.cache_server.wire import FetchBatch, decode_fetch_response
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.layout import Region
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc

FETCH_METHOD = "/contiguouskv.v1.CacheService/Fetch"

log = logging.getLogger(__name__)


def rendezvous_order(key: str, addresses: Sequence[str]) -> list[str]:
    """Addresses ordered by highest random weight for ``key`` (first = owner)."""
    def weight(address: str) -> bytes:
        return hashlib.blake2b(f"{address}|{key}".encode(), digest_size=8).digest()

    return sorted(addresses, key=weight, reverse=True)


def cache_error(address: str, err: grpc.aio.AioRpcError) -> ComputeError:
    """A cache server's status, passed on with the same code and the shard named."""
    code = err.code().name if err.code() is not None else "UNKNOWN"
    if code in ("CANCELLED", "UNKNOWN"):
        code = "UNAVAILABLE" if code == "CANCELLED" else "INTERNAL"
    return ComputeError(f"cache server {address}: {err.details()}", code=code)


class RecordStream:
    """One open Fetch stream: ``read``/``cancel`` requests out, batches of records in."""

    def __init__(self, address: str, call: grpc.aio.StreamStreamCall) -> None:
        self.address = address
        self._call = call

    async def open(self, prefix_id: str, layout: str, batch_bytes: int) -> None:
        await self._write(cache_pb2.FetchRequest(
            open=cache_pb2.FetchOpen(prefix_id=prefix_id, layout=layout, max_batch_bytes=batch_bytes)))

    async def read(self, tag: int, region: str, indices: Sequence[int], priority: int = 0) -> None:
        await self._write(cache_pb2.FetchRequest(
            read=cache_pb2.FetchRead(tag=tag, region=region, indices=indices, priority=priority)))

    async def cancel(self, tags: Sequence[int]) -> None:
        await self._write(cache_pb2.FetchRequest(cancel=cache_pb2.FetchCancel(tags=tags)))

    async def responses(self) -> AsyncIterator[FetchBatch]:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    return
                yield message
        except grpc.aio.AioRpcError as err:
            raise cache_error(self.address, err) from err

    async def close(self) -> None:
        self._call.cancel()

    async def _write(self, request: cache_pb2.FetchRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as err:
            raise cache_error(self.address, err) from err


class CacheClient:
    """Async access to the cache shards; created and closed on the server's event loop."""

    def __init__(self, addresses: Sequence[str], max_message_bytes: int, timeout_s: float) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._addresses = list(addresses)
        self._channels = {a: grpc.aio.insecure_channel(a, options=options) for a in addresses}
        self._stubs = {a: cache_pb2_grpc.CacheServiceStub(c) for a, c in self._channels.items()}
        self._timeout = timeout_s

    def owner(self, prefix_id: str) -> str:
        return rendezvous_order(prefix_id, self._addresses)[0]

    async def get_manifest(self, prefix_id: str, layout: str) -> cache_pb2.Manifest | None:
        """The committed manifest, or None when the shard does not hold the object."""
        address = self.owner(prefix_id)
        try:
            reply = await self._stubs[address].GetManifest(
                cache_pb2.GetManifestRequest(prefix_id=prefix_id, layout=layout), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise cache_error(address, err) from err
        return reply.manifest

    async def put_prefix(self, prefix_id: str, layout: str, regions: Iterable[Region], metadata: bytes,
                         payloads: Iterable[tuple[str, int, memoryview]]) -> cache_pb2.PutPrefixResponse:
        """Store one object; returns after the shard committed it durably."""
        header = cache_pb2.PutPrefixHeader(
            prefix_id=prefix_id, layout=layout, metadata=metadata,
            regions=[cache_pb2.RegionSpec(name=r.name, num_records=r.num_records, record_size=r.record_size)
                     for r in regions])

        async def requests() -> AsyncIterator[cache_pb2.PutPrefixRequest]:
            yield cache_pb2.PutPrefixRequest(header=header)
            for region, first, data in payloads:
                yield cache_pb2.PutPrefixRequest(
                    data=cache_pb2.PutPrefixData(region=region, first_record=first, data=bytes(data)))
            yield cache_pb2.PutPrefixRequest(commit=cache_pb2.PutPrefixCommit())

        address = self.owner(prefix_id)
        try:
            return await self._stubs[address].PutPrefix(requests(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise cache_error(address, err) from err

    async def report_attention(self, prefix_id: str, layout: str, scores: Sequence[object]) -> None:
        """Send one request's per-record observations; failures are logged, never raised."""
        request = cache_pb2.ReportAttentionRequest(prefix_id=prefix_id, layout=layout, records=[
            cache_pb2.RecordScores(region=s.region, indices=s.indices, attention=s.attention,  # type: ignore[attr-defined]
                                   important_fraction=s.important_fraction)  # type: ignore[attr-defined]
            for s in scores])
        address = self.owner(prefix_id)
        try:
            await self._stubs[address].ReportAttention(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            log.debug("attention report to %s failed: %s %s", address, err.code(), err.details())

    async def open_stream(self, prefix_id: str, layout: str, batch_bytes: int) -> RecordStream:
        address = self.owner(prefix_id)
        # Responses are parsed by the cache's raw decoder: ``data`` is a zero-copy memoryview.
        fetch = self._channels[address].stream_stream(
            FETCH_METHOD, request_serializer=cache_pb2.FetchRequest.SerializeToString,
            response_deserializer=decode_fetch_response)
        stream = RecordStream(address, fetch(timeout=self._timeout))
        await stream.open(prefix_id, layout, batch_bytes)
        return stream

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
