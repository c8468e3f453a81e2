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
import math
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from contiguouskv.cache_server.assemble import BatchAssembler
from contiguouskv.cache_server.buffers import ReadBuffers
from contiguouskv.cache_server.read_process import ReadProcesses
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.errors import CacheError, InvalidArgument
from contiguouskv.cache_server.fetch import (
    DEFAULT_INFLIGHT_BYTES,
    DISK_BYTES_PER_PAYLOAD_BYTE,
    MAX_INDICES_PER_READ,
    FetchSession,
)
from contiguouskv.cache_server.keys import ObjectKey
from contiguouskv.cache_server.manifest import Manifest
from contiguouskv.cache_server.reader import ObjectReader
from contiguouskv.cache_server.shm_plane import PlaneServer, PlaneStream
from contiguouskv.cache_server.store import RecordStore
from contiguouskv.common.fetch_wire import serialize_fetch_response
from contiguouskv.common.status import status_details
from contiguouskv.common.access import method_scopes
from contiguouskv.common.security import READ, WRITE
from contiguouskv.v1 import cache_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name
# The token scope each RPC needs (contiguouskv.common.access); every RPC of the service is listed.
METHOD_SCOPES = method_scopes(SERVICE_NAME, {
    # ReportAttention steers what the DRAM cache keeps: state changes need ``write``.
    "PutPrefix": WRITE, "DeletePrefix": WRITE, "ReportAttention": WRITE,
    "GetManifest": READ, "Fetch": READ, "ListPrefixes": READ, "GetStats": READ,
})
STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}

F = TypeVar("F", bound=Callable[..., Any])


def _status_of(error: CacheError) -> grpc.StatusCode:
    return STATUS_BY_CODE.get(error.code, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, rpc: str, error: CacheError) -> None:
    code = _status_of(error)
    # NOT_FOUND is an answer, not a failure (a compute server asks whether a prefix is stored before
    # every registration): debug only
    level = logging.DEBUG if code is grpc.StatusCode.NOT_FOUND else logging.INFO
    logger.log(level, "%s failed: %s %s", rpc, code.name, status_details(str(error)))
    await context.abort(code, status_details(str(error)))


def _unparsable(exc: DecodeError) -> InvalidArgument:
    """A message of a request stream that grpc could not parse (it reaches the handler, not grpc)."""
    return InvalidArgument(f"a request message could not be parsed: {exc}")


def _rpc(method: F) -> F:
    """Turn a ``CacheError`` raised by an RPC (coroutine or async generator) into its status, and a
    request-stream message that cannot be parsed into INVALID_ARGUMENT."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in method(self, request, context):
                    yield response
            except CacheError as exc:
                await _abort(context, method.__name__, exc)
            except DecodeError as exc:
                await _abort(context, method.__name__, _unparsable(exc))

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except CacheError as exc:
            await _abort(context, method.__name__, exc)
        except DecodeError as exc:
            await _abort(context, method.__name__, _unparsable(exc))

    return cast(F, unary)


@contextlib.contextmanager
def _closing(plane: PlaneStream | None) -> Iterator[None]:
    """Close a Fetch call's plane stream when the call ends (its sent slots stay the client's)."""
    try:
        yield
    finally:
        if plane is not None:
            plane.close()


def _close_opened(opening: asyncio.Future[ObjectReader]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


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



DRAIN_SLACK_BYTES = 1 << 20
"""What a refused upload may send beyond its declared records before the refusal goes out anyway."""


async def _drain(requests: AsyncIterator[pb.PutPrefixRequest], limit: int) -> None:
    """Read and drop the rest of an upload, up to ``limit`` bytes of records."""
    seen = 0
    async for request in requests:
        seen += len(request.data.data) if request.WhichOneof("kind") == "data" else 0
        if seen > limit:
            return

class CacheServicer:
    """``contiguouskv.v1.CacheService`` for ``grpc.aio`` over ``store`` and ``cache``.

    Reads run on ``read_pool``, Fetch reads in ``helpers`` when given. ``max_batch_bytes`` is the
    server's cap (and default) for a Fetch response's payload; ``max_inflight_bytes`` bounds the
    record bytes one stream holds. Register it with :func:`add_cache_service` (Fetch responses are
    prebuilt bytes, see :mod:`.wire`).
    """

    def __init__(self, store: RecordStore, read_pool: Executor, max_batch_bytes: int,
                 cache: DramCache | None = None,
                 max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
                 helpers: ReadProcesses | None = None, planes: PlaneServer | None = None) -> None:
        self._store = store
        self._planes = planes
        self._helpers = helpers
        self._read_pool = read_pool
        self._max_batch_bytes = max_batch_bytes
        self._max_inflight_bytes = max(max_inflight_bytes, max_batch_bytes)
        self._cache = cache if cache is not None else DramCache(0, counters=store.counters)
        self._buffers = ReadBuffers(DISK_BYTES_PER_PAYLOAD_BYTE * max_batch_bytes)

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
                    try:
                        writer = await asyncio.to_thread(self._store.begin_put, key, regions, h.metadata)
                    except CacheError:
                        # Refused before any byte was written (store full, bad header). Read what the
                        # client is still sending first: a status sent mid-upload can reach it as
                        # gRPC's "Internal error from Core" instead of this refusal.
                        declared = sum(n * size for _, n, size in regions)
                        await _drain(request_iterator, declared + DRAIN_SLACK_BYTES)
                        raise
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

    async def _open(self, key: ObjectKey) -> ObjectReader:
        """The object's reader, opened off the loop; a call cancelled meanwhile closes it once open
        (else its descriptor would outlive the stream)."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._store.open_object, key))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise

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
        plane = None  # a co-located client's shared memory, when it names a plane this server has
        if first.open.shm_plane and self._planes is not None:
            found = self._planes.find(first.open.shm_plane)
            plane = found.open_stream(first.open.shm_stream) if found is not None else None
        inflight = self._max_inflight_bytes
        if plane is not None:  # batches go to the client's slots, not into gRPC messages: a slot each
            batch_bytes = min(wanted, plane.slot_bytes) if wanted else plane.slot_bytes
            inflight = max(inflight, SHM_BATCHES_IN_FLIGHT * batch_bytes)
        with await self._open(key) as reader, _closing(plane):
            assembler = BatchAssembler(reader, self._cache, self._buffers, self._store.counters)
            session = FetchSession(
                reader,
                assembler,
                self._read_pool,
                self._store.counters,
                max_batch_bytes=batch_bytes,
                max_read_bytes=DISK_BYTES_PER_PAYLOAD_BYTE * max(batch_bytes, self._max_batch_bytes),
                max_inflight_bytes=inflight,
                helpers=self._helpers,
                plane=plane,
            )
            feeder = asyncio.create_task(_feed(request_iterator, session))
            try:
                async with contextlib.aclosing(session.responses()) as batches:
                    async for batch in batches:
                        yield batch.wire
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

    @_rpc
    async def DeletePrefix(
        self, request: pb.DeletePrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePrefixResponse:
        result = await asyncio.to_thread(self._store.delete, request.prefix_id, request.layout)
        for key in result.keys:
            await asyncio.to_thread(self._cache.drop_object, key)
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
        s = self._store.stats(self._cache)
        counters = {name: s.values[name] for name in STATS_FIELDS}
        return pb.GetStatsResponse(
            objects=s.objects, stored_bytes=s.stored_bytes, direct_io=s.direct_io,
            dram_bytes=s.dram_bytes, dram_budget_bytes=s.dram_budget_bytes,
            cache_policy=s.eviction_rule, **counters,  # the wire keeps the field's old name
        )

    @_rpc
    async def ReportAttention(
        self, request: pb.ReportAttentionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportAttentionResponse:
        manifest = self._store.manifest(ObjectKey(request.prefix_id, request.layout))
        updated = await asyncio.to_thread(self._report, manifest, request)
        return pb.ReportAttentionResponse(records_updated=updated)

    def _report(self, manifest: Manifest, request: pb.ReportAttentionRequest) -> int:
        obj = (manifest.key, manifest.committed_at)
        checked = [_checked_scores(manifest, scores) for scores in request.records]
        if sum(len(c[1]) for c in checked) > MAX_INDICES_PER_READ:
            raise InvalidArgument(f"records: more than {MAX_INDICES_PER_READ} records in one report")
        return sum(self._cache.report(obj, *c) for c in checked)


SHM_BATCHES_IN_FLIGHT = 4  # per shared-memory stream: batches being written at once

STATS_FIELDS = (
    "bytes_read_from_disk", "bytes_served", "records_served", "fetch_streams_total",
    "checksum_failures", "dram_hits", "dram_misses", "dram_evictions", "bytes_served_from_dram",
    "records_requested", "bytes_requested", "bytes_requested_from_disk", "disk_reads",
    "buffered_reads", "fetch_requests_failed", "inflight_streams", "inflight_reads",
    "inflight_bytes", "shm_planes", "shm_slots_lent", "bytes_served_shm", "bytes_served_in_place", "shm_leases",
)


def _checked_scores(
    manifest: Manifest, scores: pb.RecordScores
) -> tuple[str, list[int], list[float], list[float] | None]:
    """One region's scores, validated (``InvalidArgument`` naming the bad field)."""
    layout = manifest.region(scores.region)
    indices, attention = list(scores.indices), list(scores.attention)
    important = list(scores.important_fraction) or None
    if len(attention) != len(indices):
        raise InvalidArgument(f"records.attention: {len(attention)} values for {len(indices)} indices")
    if important is not None and len(important) != len(indices):
        raise InvalidArgument(
            f"records.important_fraction: {len(important)} values for {len(indices)} indices")
    if indices:
        layout.check_index(max(indices))
    if not all(0.0 <= a < math.inf for a in attention):
        raise InvalidArgument("records.attention: values must be finite and >= 0")
    if important is not None and not all(0.0 <= f <= 1.0 for f in important):
        raise InvalidArgument("records.important_fraction: values must be in [0, 1]")
    return layout.name, indices, attention, important


def add_cache_service(servicer: CacheServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` on ``server``, with a raw-bytes response serializer for Fetch.

    The handlers are built from the service descriptor, so they follow ``cache.proto``.
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["CacheService"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        serializer = (serialize_fetch_response if method.name == "Fetch"
                      else response_cls.SerializeToString)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=request_cls.FromString,
                                     response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _feed(request_iterator: AsyncIterator[pb.FetchRequest], session: FetchSession) -> None:
    """Pass a Fetch stream's requests after ``open`` to ``session``; errors end the session."""
    try:
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "read":
                r = request.read
                session.submit(r.tag, r.region, r.indices, r.priority)
            elif kind == "reads":
                for r in request.reads.reads:
                    session.submit(r.tag, r.region, r.indices, r.priority)
            elif kind == "cancel":
                session.cancel(request.cancel.tags)
            else:
                raise InvalidArgument(f"Fetch: unexpected {kind!r} message after 'open'")
        session.close_input()
    except DecodeError as exc:  # a garbled message after `open`: the handler answers INVALID_ARGUMENT
        session.fail(_unparsable(exc))
    except Exception as exc:  # the session re-raises it in the handler, which maps it
        session.fail(exc)
