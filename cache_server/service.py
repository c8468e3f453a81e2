"""The gRPC face of the cache server: a thin ``CacheService`` over the store and fetch sessions.

Each RPC decodes its request, calls a plain object and encodes the reply. Errors of the plain
objects become gRPC statuses in one place, :func:`_status_of` (applied by :func:`_rpc`). Blocking
store calls run off the event loop: disk reads on the read pool, everything else on the loop's
default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar, cast

import grpc

from contiguouskv.cache_server.errors import (
    CacheError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from contiguouskv.cache_server.fetch import DISK_BYTES_PER_PAYLOAD_BYTE, Batch, FetchSession
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.manifest import Manifest
from contiguouskv.cache_server.store import RecordStore
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc

logger = logging.getLogger(__name__)

STATUS_OF_ERROR: tuple[tuple[type[CacheError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DataLoss, grpc.StatusCode.DATA_LOSS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
)

F = TypeVar("F", bound=Callable[..., Any])


def _status_of(error: CacheError) -> grpc.StatusCode:
    for cls, code in STATUS_OF_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, rpc: str, error: CacheError) -> None:
    code = _status_of(error)
    logger.info("%s failed: %s %s", rpc, code.name, error)
    await context.abort(code, str(error))


def _rpc(method: F) -> F:
    """Turn a ``CacheError`` raised by an RPC (coroutine or async generator) into its status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in method(self, request, context):
                    yield response
            except CacheError as exc:
                await _abort(context, method.__name__, exc)

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except CacheError as exc:
            await _abort(context, method.__name__, exc)

    return cast(F, unary)


def manifest_to_pb(manifest: Manifest, with_metadata: bool = True) -> pb.Manifest:
    """Encode a manifest; ``total_bytes`` is the data file's size on disk (padding included)."""
    return pb.Manifest(
        prefix_id=manifest.key.prefix_id,
        layout=manifest.key.layout,
        regions=[
            pb.RegionSpec(name=r.name, num_records=r.num_records, record_size=r.record_size)
            for r in manifest.regions.values()
        ],
        metadata=manifest.metadata if with_metadata else b"",
        total_bytes=manifest.data_bytes,
        committed_at=manifest.committed_at,
    )


def batch_to_pb(batch: Batch) -> pb.FetchResponse:
    """Encode one Fetch batch."""
    return pb.FetchResponse(
        tag=batch.tag,
        region=batch.region,
        indices=batch.indices,
        data=batch.data,
        done=batch.done,
        cancelled=batch.cancelled,
    )


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """``contiguouskv.v1.CacheService`` for ``grpc.aio`` over ``store``; reads run on ``read_pool``.

    ``max_batch_bytes`` is the server's cap (and default) for a Fetch response's payload.
    """

    def __init__(self, store: RecordStore, read_pool: Executor, max_batch_bytes: int) -> None:
        self._store = store
        self._read_pool = read_pool
        self._max_batch_bytes = max_batch_bytes

    @_rpc
    async def PutPrefix(
        self, request_iterator: AsyncIterator[pb.PutPrefixRequest], context: grpc.aio.ServicerContext
    ) -> pb.PutPrefixResponse:
        writer = None
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if writer is None:
                    if kind != "header":
                        raise InvalidArgument(f"PutPrefix: first message is {kind!r}, not 'header'")
                    h = request.header
                    regions = [(r.name, r.num_records, r.record_size) for r in h.regions]
                    key = ObjectKey(h.prefix_id, h.layout)
                    writer = await asyncio.to_thread(self._store.begin_put, key, regions, h.metadata)
                elif kind == "data":
                    d = request.data
                    await asyncio.to_thread(writer.write, d.region, d.first_record, d.data)
                elif kind == "commit":
                    result = await asyncio.to_thread(self._store.commit, writer)
                    writer = None
                    return pb.PutPrefixResponse(
                        manifest=manifest_to_pb(result.manifest),
                        already_committed=result.already_committed,
                        bytes_written=result.bytes_written,
                    )
                else:
                    raise InvalidArgument(f"PutPrefix: unexpected {kind!r} message after the header")
            raise InvalidArgument("PutPrefix: the stream ended without a commit")
        finally:
            if writer is not None:  # failed or cancelled: shielded, the temp file always goes
                await asyncio.shield(asyncio.to_thread(self._store.abort, writer))

    @_rpc
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetManifestResponse:
        manifest = self._store.manifest(ObjectKey(request.prefix_id, request.layout))
        return pb.GetManifestResponse(manifest=manifest_to_pb(manifest))

    @_rpc
    async def Fetch(
        self, request_iterator: AsyncIterator[pb.FetchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument(f"Fetch: first message is {first.WhichOneof('kind')!r}, not 'open'")
        key = ObjectKey(first.open.prefix_id, first.open.layout)
        wanted = first.open.max_batch_bytes
        batch_bytes = min(wanted, self._max_batch_bytes) if wanted else self._max_batch_bytes
        with await asyncio.to_thread(self._store.open_object, key) as reader:
            session = FetchSession(
                reader,
                self._read_pool,
                self._store.counters,
                max_batch_bytes=batch_bytes,
                max_read_bytes=DISK_BYTES_PER_PAYLOAD_BYTE * self._max_batch_bytes,
            )
            feeder = asyncio.create_task(_feed(request_iterator, session))
            try:
                async with contextlib.aclosing(session.responses()) as batches:
                    async for batch in batches:
                        yield batch_to_pb(batch)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

    @_rpc
    async def DeletePrefix(
        self, request: pb.DeletePrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePrefixResponse:
        result = await asyncio.to_thread(self._store.delete, request.prefix_id, request.layout)
        return pb.DeletePrefixResponse(
            layouts_deleted=result.layouts_deleted, bytes_freed=result.bytes_freed
        )

    @_rpc
    async def ListPrefixes(
        self, request: pb.ListPrefixesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPrefixesResponse:
        manifests = self._store.list(request.prefix_id)
        return pb.ListPrefixesResponse(
            manifests=[manifest_to_pb(m, with_metadata=False) for m in manifests]
        )

    @_rpc
    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        s = self._store.stats()
        return pb.GetStatsResponse(
            objects=s.objects,
            stored_bytes=s.stored_bytes,
            bytes_read_from_disk=s.bytes_read_from_disk,
            bytes_served=s.bytes_served,
            records_served=s.records_served,
            fetch_streams_total=s.fetch_streams_total,
            checksum_failures=s.checksum_failures,
            direct_io=s.direct_io,
        )


async def _feed(request_iterator: AsyncIterator[pb.FetchRequest], session: FetchSession) -> None:
    """Pass a Fetch stream's requests after ``open`` to ``session``; errors end the session."""
    try:
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "read":
                r = request.read
                session.submit(r.tag, r.region, r.indices, r.priority)
            elif kind == "cancel":
                session.cancel(request.cancel.tags)
            else:
                raise InvalidArgument(f"Fetch: unexpected {kind!r} message after 'open'")
        session.close_input()
    except Exception as exc:  # the session re-raises it in the handler, which maps it
        session.fail(exc)
