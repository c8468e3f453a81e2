"""Blocking client of one or several compute servers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from contiguouskv.client import _wire
from contiguouskv.client.errors import ContiguousKVError
from contiguouskv.client.pool import Endpoint, RoundRobin, parse_addresses
from contiguouskv.client.retry import DEFAULT_RETRY, Deadline, RetryPolicy, check_retry
from contiguouskv.client.types import GeneratedToken, ModelInfo, RegisteredPrefix, ReprefillResult
from contiguouskv.common import telemetry
from contiguouskv.common.security import ClientTls, open_channel
from contiguouskv.common.telemetry import Attributes
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc

log = logging.getLogger(__name__)
_tracer = telemetry.Tracer("contiguouskv.client")

R = TypeVar("R")
Stub = compute_pb2_grpc.ComputeServiceStub


def _connector(tls: ClientTls | None, token: str | None) -> Callable[[str], Endpoint[grpc.Channel, Stub]]:
    def connect(address: str) -> Endpoint[grpc.Channel, Stub]:
        channel = telemetry.intercept_channel(open_channel(address, tls, token, _wire.CHANNEL_OPTIONS))
        return Endpoint(address, channel, compute_pb2_grpc.ComputeServiceStub(channel), secure=tls is not None)

    return connect


def _cancel(stream: object) -> None:
    """End a response stream early (a no-op once it ended); traced channels hand out a generator."""
    cancel = getattr(stream, "cancel", None) or getattr(stream, "close", None)
    if cancel is not None:
        cancel()


class ContiguousKVClient:
    """Talks to the compute servers at ``address``; every call has a timeout and typed results.

    ``address``: ``"HOST:PORT"``, ``"H1:P1,H2:P2"`` or a list of them; calls go to the servers in
    turn (round robin), and a retry goes to the next one. ``timeout``: default seconds per call
    (all attempts together); each method also takes ``timeout=``. ``retry``: when to repeat a call
    that met UNAVAILABLE (see :mod:`contiguouskv.client.retry`; ``NO_RETRY`` turns it off).
    ``token``: a bearer token sent with every call (servers started with ``--auth-tokens-file``);
    ``tls``: a :class:`ClientTls` (CA bundle, optional client certificate for mutual TLS) for
    servers that serve TLS. A token needs TLS unless the servers are on loopback (``ValueError``).

    Use as a context manager or call :meth:`close`. Errors are :class:`ContiguousKVError` subclasses;
    no grpc type reaches the caller. Safe to share between threads.
    """

    def __init__(self, address: str | Sequence[str], *, timeout: float = 300.0,
                 retry: RetryPolicy = DEFAULT_RETRY, token: str | None = None,
                 tls: ClientTls | None = None) -> None:
        self.addresses = parse_addresses(address)
        self.address = self.addresses[0]
        self.timeout = timeout
        self.retry = check_retry(retry)
        Deadline(timeout)  # checks it
        self._pool: RoundRobin[grpc.Channel, Stub] = RoundRobin(self.addresses, _connector(tls, token))
        self._closed = False

    def __enter__(self) -> "ContiguousKVClient":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels; a stream still open ends with CANCELLED, later calls raise
        :class:`FailedPreconditionError`."""
        self._closed = True
        for endpoint in self._pool.endpoints:
            endpoint.channel.close()

    def register(self, text: str | None = None, *, token_ids: Sequence[int] | None = None,
                 extra_layouts: Sequence[str] = (), timeout: float | None = None) -> RegisteredPrefix:
        """Prefill and store a prefix given as text or token ids; returns its id.

        ``extra_layouts``: layouts to store besides `contiguous`; ``["impress"]`` is what the `h2o`
        and `impress` policies read. Registering again with a new layout adds just that layout.
        Idempotent (the id is a content hash), so retried on UNAVAILABLE.
        """
        request = _wire.register_request(text, token_ids, extra_layouts)
        reply = self._call("register", lambda stub, t: stub.RegisterPrefix(request, timeout=t), {}, timeout)
        return _wire.registered(reply)

    def reprefill(self, prefix_id: str, query: str | Sequence[int], *, policy: str = "full",
                  budget: float | None = None, max_new_tokens: int = 0, period: int | None = None,
                  sub_period: int | None = None, return_logits: bool = False, evaluate_recall: bool = False,
                  measure_floor: bool = False,
                  timeout: float | None = None) -> ReprefillResult:
        """First token of prefix + query (text or token ids) under a loading policy.

        ``policy``: recompute | full | contiguous | contiguous+ | h2o | impress (the last two need a
        prefix registered with ``extra_layouts=["impress"]``); ``budget``: fraction of the prefix kept
        (chunks, or tokens for h2o/impress); ``period``/``sub_period``: layers per selection and per
        fetch run (contiguous policies); ``measure_floor``: also time the same query over the same
        prefix K/V held resident, off the TTFT clock (``timings.resident_compute_ms`` and
        ``timings.overhead_ms``; for benchmarks). Read-only, so retried on UNAVAILABLE.
        """
        request = _wire.reprefill_request(prefix_id, query, policy, budget, max_new_tokens, period, sub_period,
                                          return_logits, evaluate_recall, measure_floor)
        attributes = {telemetry.ATTR_PREFIX_ID: prefix_id, telemetry.ATTR_POLICY: policy}
        reply = self._call("reprefill", lambda stub, t: stub.Reprefill(request, timeout=t), attributes, timeout)
        return _wire.result(reply)

    def generate(self, prefix_id: str, query: str | Sequence[int], *, max_new_tokens: int = 32,
                 policy: str = "full", budget: float | None = None,
                 timeout: float | None = None) -> Iterator[GeneratedToken]:
        """Stream tokens as they are computed: the first token, then up to ``max_new_tokens`` more.

        Retried on UNAVAILABLE only before the first token arrived. Close the iterator (or leave
        the loop) to cancel the stream. The arguments are checked here, before the first token.
        """
        request = compute_pb2.GenerateRequest(request=_wire.reprefill_request(
            prefix_id, query, policy, budget, max_new_tokens, None, None))
        deadline = Deadline(self.timeout if timeout is None else timeout)
        if self._closed:
            raise _wire.closed()
        return self._stream(request, deadline, prefix_id, policy)

    def _stream(self, request: compute_pb2.GenerateRequest, deadline: Deadline, prefix_id: str,
                policy: str) -> Iterator[GeneratedToken]:
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
                    for message in stream:
                        if not message.HasField("summary"):
                            delivered += 1
                            yield _wire.token(message)
                    span.set_attribute(telemetry.ATTR_TOKENS, delivered)
                    return
                except grpc.RpcError as err:
                    error = _wire.to_error(err, endpoint.address, endpoint.secure, delivered)
                except ValueError:  # grpc's "Cannot invoke RPC: Channel closed!"
                    if not self._closed:
                        raise
                    error = _wire.closed()
                finally:
                    _cancel(stream)
                delay = None if delivered else self.retry.delay_before_retry(error, attempts, deadline)
                if delay is None:
                    telemetry.mark_error(span, error)
                    raise error
                time.sleep(delay)
        finally:
            span.end()

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server runs (model shape, dtype, device, chunk size, policies). Read-only."""
        reply = self._call("model_info", lambda stub, t: stub.GetModelInfo(compute_pb2.GetModelInfoRequest(),
                                                                           timeout=t), {}, timeout)
        return _wire.model_info(reply)

    def _call(self, what: str, invoke: Callable[[Stub, float], R], attributes: Attributes,
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
                    return invoke(endpoint.stub, deadline.attempt_timeout(endpoint.address))
                except grpc.RpcError as err:
                    error: ContiguousKVError = _wire.to_error(err, endpoint.address, endpoint.secure)
                except ValueError:  # grpc's "Cannot invoke RPC on closed channel!": closed meanwhile
                    if not self._closed:
                        raise
                    raise _wire.closed() from None
                delay = self.retry.delay_before_retry(error, attempts, deadline)
                if delay is None:
                    raise error
                log.debug("%s: %s; retrying in %.2fs", what, error, delay)
                time.sleep(delay)
