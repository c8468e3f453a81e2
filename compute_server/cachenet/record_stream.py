"""One Fetch stream as the loader sees it: ``read``/``cancel`` out, batches of records in.

:class:`FetchStream` is the interface the KV loader (:mod:`..kvio`) talks to. :class:`RecordStream`
is one call to one cache shard and never fails over; :class:`~.failover.ReplicaStream` wraps it
to move to the next replica when the shard breaks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, cast

import grpc

from contiguouskv.common.fetch_wire import FetchBatch
from contiguouskv.compute_server.cachenet.shm_plane import PlaneError, PlaneStreamState
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.v1 import cache_pb2


def cache_error(address: str, err: grpc.aio.AioRpcError) -> ComputeError:
    """A cache server's status, passed on with the same code and the shard named."""
    code = err.code().name if err.code() is not None else "UNKNOWN"
    if code in ("CANCELLED", "UNKNOWN"):
        code = "UNAVAILABLE" if code == "CANCELLED" else "INTERNAL"
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # the compute server's credentials, not the caller's
        return ComputeError(f"cache server {address} refused this compute server's credentials ({code}: "
                            f"{err.details()}); check its cache_token_file and cache TLS settings",
                            code="FAILED_PRECONDITION")
    return ComputeError(f"cache server {address}: {err.details()}", code=code)


ReadSpec = tuple[int, str, Sequence[int], int]
"""One read: ``(tag, region, indices, priority)``."""


class FetchStream(Protocol):
    """What the loader needs of a Fetch stream; all methods run on the event loop."""

    @property
    def address(self) -> str:
        """The shard currently serving the stream."""
        ...

    async def read(self, tag: int, region: str, indices: Sequence[int], priority: int = 0) -> None: ...

    async def read_many(self, reads: Sequence[ReadSpec]) -> None:
        """Several reads, in order, each as :meth:`read` would send it."""
        ...

    async def cancel(self, tags: Sequence[int]) -> None: ...

    def responses(self) -> AsyncIterator[FetchBatch]: ...

    async def close(self) -> None: ...

    def can_fail_over(self, error: ComputeError) -> bool:
        """Whether another replica may serve what ``error`` broke."""
        ...

    async def failover(self, error: BaseException) -> bool:
        """Give up the current shard after ``error``; True once another one is open."""
        ...

    def exhausted(self, error: BaseException | None = None) -> ComputeError:
        """The error to report once the stream cannot go on."""
        ...


class RecordStream:
    """One open Fetch call to one shard.

    With ``plane`` (a co-located cache server's shared-memory plane, :mod:`.shm_plane`) the stream
    asks for records as descriptors into shared memory; batches that arrive so are checked and leased
    (:meth:`.shm_plane.PlaneStreamState.receive`). Batches may still come as bytes: from a server
    that does not know the plane (not the co-located one), or when every slot is in use.
    """

    def __init__(self, address: str, call: grpc.aio.StreamStreamCall, plane: PlaneStreamState | None = None) -> None:
        self._address = address
        self._call = call
        self._plane = plane

    @property
    def address(self) -> str:
        return self._address

    @property
    def plane(self) -> PlaneStreamState | None:
        """The stream's shared-memory bookkeeping (``None``: bytes over gRPC only)."""
        return self._plane

    async def open(self, prefix_id: str, layout: str, batch_bytes: int) -> None:
        plane = self._plane
        if plane is not None:  # a batch fills at most one slot; bigger batches, fewer messages
            batch_bytes = plane.plane.slot_bytes
        await self._write(cache_pb2.FetchRequest(open=cache_pb2.FetchOpen(
            prefix_id=prefix_id, layout=layout, max_batch_bytes=batch_bytes,
            shm_plane=plane.plane.id if plane is not None else "", shm_stream=plane.id if plane is not None else 0)))

    async def read(self, tag: int, region: str, indices: Sequence[int], priority: int = 0) -> None:
        await self._write(cache_pb2.FetchRequest(
            read=cache_pb2.FetchRead(tag=tag, region=region, indices=indices, priority=priority)))

    async def read_many(self, reads: Sequence[ReadSpec]) -> None:
        """One message for all of ``reads`` (``FetchReads``): one write, not one per read."""
        if len(reads) == 1:
            await self.read(*reads[0])
        elif reads:
            await self._write(cache_pb2.FetchRequest(reads=cache_pb2.FetchReads(reads=[
                cache_pb2.FetchRead(tag=tag, region=region, indices=indices, priority=priority)
                for tag, region, indices, priority in reads])))

    async def cancel(self, tags: Sequence[int]) -> None:
        await self._write(cache_pb2.FetchRequest(cancel=cache_pb2.FetchCancel(tags=tags)))

    async def responses(self) -> AsyncIterator[FetchBatch]:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    return
                for batch in self._checked(cast(FetchBatch, message)):  # deserializer: decode_fetch_response
                    yield batch
        except grpc.aio.AioRpcError as err:
            raise cache_error(self._address, err) from err
        finally:
            if self._plane is not None:
                self._plane.finish()

    def _checked(self, batch: FetchBatch) -> list[FetchBatch]:
        """Batches whose ``data`` may be used: shared-memory descriptors resolved and checked (DRAM
        hits read in place come as one batch per run of adjacent records)."""
        if batch.shm is not None:
            if self._plane is None:
                raise ComputeError(f"cache server {self._address}: a shared-memory descriptor on a stream "
                                   f"without a plane", code="INTERNAL")
            try:
                return self._plane.receive(batch)
            except PlaneError as exc:
                raise ComputeError(f"cache server {self._address}: {exc}", code="DATA_LOSS") from None
        return [batch]

    async def close(self) -> None:
        self._call.cancel()
        if self._plane is not None:
            self._plane.finish()

    def can_fail_over(self, error: ComputeError) -> bool:
        return False

    async def failover(self, error: BaseException) -> bool:
        await self.close()
        return False

    def exhausted(self, error: BaseException | None = None) -> ComputeError:
        if isinstance(error, ComputeError):
            return error
        return ComputeError(f"cache server {self._address}: fetch stream failed: {error!r}", code="UNAVAILABLE")

    async def _write(self, request: cache_pb2.FetchRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as err:
            raise cache_error(self._address, err) from err
