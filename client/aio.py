"""Asyncio client of one or several compute servers (same surface as :class:`ContiguousKVClient`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc

from contiguouskv.client import _wire
from contiguouskv.client.errors import ContiguousKVError
from contiguouskv.client.pool import Endpoint, RoundRobin, parse_addresses
from contiguouskv.client.retry import DEFAULT_RETRY, Deadline, RetryPolicy, check_retry
from contiguouskv.client.types import GeneratedToken, ModelInfo, RegisteredPrefix, ReprefillResult
from contiguouskv.common import telemetry
from contiguouskv.common.security import ClientTls, open_aio_channel
from contiguouskv.common.telemetry import Attributes
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc

log = logging.getLogger(__name__)
_tracer = telemetry.Tracer("contiguouskv.client")

if TYPE_CHECKING:  # the async stub type exists only for type checkers
    from contiguouskv.v1.compute_pb2_grpc import ComputeServiceAsyncStub as Stub

R = TypeVar("R")


def _connector(tls: ClientTls | None, token: str | None) -> Callable[[str], Endpoint[grpc.aio.Channel, Stub]]:
    def connect(address: str) -> Endpoint[grpc.aio.Channel, Stub]:
        channel = open_aio_channel(address, tls, token, _wire.CHANNEL_OPTIONS,
                                   telemetry.aio_client_interceptors() or None)
        return Endpoint(address, channel, compute_pb2_grpc.ComputeServiceStub(channel), secure=tls is not None)

    return connect


def _cancelled_by_caller() -> bool:
    """Whether the running task is being cancelled (by its owner, not by a closed channel)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+; before, assume the caller's
    return task is None or cancelling is None or cancelling() > 0


class AsyncContiguousKVClient:
    """Async client; ``address``, ``timeout``, ``retry``, ``token`` and ``tls`` as in :class:`ContiguousKVClient`.

    Use ``async with`` or ``await close()``; create it inside a running event loop (in a coroutine)
    and use it on that loop only.
    """

    def __init__(self, address: str | Sequence[str], *, timeout: float = 300.0,
                 retry: RetryPolicy = DEFAULT_RETRY, token: str | None = None,
                 tls: ClientTls | None = None) -> None:
        self.addresses = parse_addresses(address)
        self.address = self.addresses[0]
        self.timeout = timeout
        self.retry = check_retry(retry)
        Deadline(timeout)  # checks it
        self._pool: RoundRobin[grpc.aio.Channel, Stub] = RoundRobin(self.addresses, _connector(tls, token))
        self._closed = False

    async def __aenter__(self) -> "AsyncContiguousKVClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels; a stream still open ends with CANCELLED, later calls raise
        :class:`FailedPreconditionError`."""
        self._closed = True
        for endpoint in self._pool.endpoints:
            await endpoint.channel.close()

    async def register(self, text: str | None = None, *, token_ids: Sequence[int] | None = None,
                       extra_layouts: Sequence[str] = (), timeout: float | None = None) -> RegisteredPrefix:
        """See :meth:`ContiguousKVClient.register`."""
        request = _wire.register_request(text, token_ids, extra_layouts)
        reply = await self._call("register", lambda stub, t: stub.RegisterPrefix(request, timeout=t), {}, timeout)
        return _wire.registered(reply)

    async def reprefill(self, prefix_id: str, query: str | Sequence[int], *, policy: str = "full",
                        budget: float | None = None, max_new_tokens: int = 0, period: int | None = None,
                        sub_period: int | None = None, return_logits: bool = False, evaluate_recall: bool = False,
                        measure_floor: bool = False,
                        timeout: float | None = None) -> ReprefillResult:
        """See :meth:`ContiguousKVClient.reprefill`."""
        request = _wire.reprefill_request(prefix_id, query, policy, budget, max_new_tokens, period, sub_period,
                                          return_logits, evaluate_recall, measure_floor)
        attributes = {telemetry.ATTR_PREFIX_ID: prefix_id, telemetry.ATTR_POLICY: policy}
        reply = await self._call("reprefill", lambda stub, t: stub.Reprefill(request, timeout=t), attributes,
                                 timeout)
        return _wire.result(reply)

    def generate(self, prefix_id: str, query: str | Sequence[int], *, max_new_tokens: int = 32,
                 policy: str = "full", budget: float | None = None,
                 timeout: float | None = None) -> AsyncIterator[GeneratedToken]:
        """See :meth:`ContiguousKVClient.generate` (retried only before the first token; the
        arguments are checked here, before iteration)."""
        request = compute_pb2.GenerateRequest(request=_wire.reprefill_request(
            prefix_id, query, policy, budget, max_new_tokens, None, None))
        deadline = Deadline(self.timeout if timeout is None else timeout)
        if self._closed:
            raise _wire.closed()
        return self._stream(request, deadline, prefix_id, policy)

    async def _stream(self, request: compute_pb2.GenerateRequest, deadline: Deadline, prefix_id: str,
                      policy: str) -> AsyncIterator[GeneratedToken]:
        span = _tracer.start(telemetry.SPAN_CALL.format("generate"),
                             {telemetry.ATTR_PREFIX_ID: prefix_id, telemetry.ATTR_POLICY: policy})
        delivered = attempts = 0
        try:
            while True:
                endpoint, attempts = self._pool.next(), attempts + 1
                stream = None
                try:
                    with telemetry.use_span(span):
                        stream = endpoint.stub.Generate(request, timeout=deadline.attempt_timeout(endpoint.address))
                    async for message in stream:
                        if not message.HasField("summary"):
                            delivered += 1
                            yield _wire.token(message)
                    span.set_attribute(telemetry.ATTR_TOKENS, delivered)
                    return
                except grpc.RpcError as err:
                    error = _wire.to_error(err, endpoint.address, endpoint.secure, delivered)
                except (asyncio.CancelledError, grpc.aio.UsageError):
                    if not self._closed or _cancelled_by_caller():
                        raise  # the caller's own cancellation, or a misuse not ours to name
                    error = ContiguousKVError(f"the client was closed while this stream was open "
                                              f"({delivered} token(s) delivered)", "CANCELLED")
                finally:
                    if stream is not None:
                        stream.cancel()
                delay = None if delivered else self.retry.delay_before_retry(error, attempts, deadline)
                if delay is None:
                    telemetry.mark_error(span, error)
                    raise error
                await asyncio.sleep(delay)
        finally:
            span.end()

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """See :meth:`ContiguousKVClient.model_info`."""
        reply = await self._call("model_info", lambda stub, t: stub.GetModelInfo(compute_pb2.GetModelInfoRequest(),
                                                                                 timeout=t), {}, timeout)
        return _wire.model_info(reply)

    async def _call(self, what: str, invoke: Callable[[Stub, float], Awaitable[R]], attributes: Attributes,
                    timeout: float | None) -> R:
        """One unary call (all our unary calls are idempotent): next server, retry on UNAVAILABLE."""
        deadline = Deadline(self.timeout if timeout is None else timeout)
        if self._closed:
            raise _wire.closed()
        with _tracer.span(telemetry.SPAN_CALL.format(what), attributes) as span:
            attempts = 0
            while True:
                endpoint, attempts = self._pool.next(), attempts + 1
                span.set_attribute(telemetry.ATTR_ATTEMPTS, attempts)
                try:
                    return await invoke(endpoint.stub, deadline.attempt_timeout(endpoint.address))
                except grpc.RpcError as err:
                    error: ContiguousKVError = _wire.to_error(err, endpoint.address, endpoint.secure)
                except grpc.aio.UsageError:  # "Channel is closed": closed while the call was starting
                    if not self._closed:
                        raise
                    raise _wire.closed() from None
                delay = self.retry.delay_before_retry(error, attempts, deadline)
                if delay is None:
                    raise error
                log.debug("%s: %s; retrying in %.2fs", what, error, delay)
                await asyncio.sleep(delay)
