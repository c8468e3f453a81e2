"""Prometheus metrics of the compute server, observed per RPC by a server interceptor.

:class:`ComputeMetrics` owns a registry (never the global one) served over HTTP by
:func:`start_metrics_server` when ``--metrics-port`` is given. :class:`MetricsInterceptor` times
every ComputeService RPC and reads the timings its reply carries, so the request logic knows
nothing of metrics. Names follow the Prometheus conventions: ``ckv_compute_`` prefix, base units
(``_seconds``, ``_bytes``), counters ending in ``_total``.

- ``ckv_compute_requests_total{method,code}``, ``ckv_compute_request_duration_seconds{method}``,
  ``ckv_compute_inflight_requests{method}``
- ``ckv_compute_ttft_seconds{policy}``: server-side time to first token of a Re-Prefill
- ``ckv_compute_reprefill_phase_seconds{policy,phase}``: per request, ``io_wait`` (blocked on
  records), ``compute`` (layers, first token), ``fetch`` (first record asked to last arrived),
  ``decode`` (tokens after the first)
- ``ckv_compute_layer_io_wait_seconds{policy}``: per layer, time blocked on its records
- ``ckv_compute_fetched_bytes_total{policy}``, ``ckv_compute_generated_tokens_total``
- ``ckv_compute_thread_busy_seconds_total`` (the compute thread running model ops; its rate is
  the thread's utilisation), ``ckv_compute_thread_passes_total{batched}`` (passes that served one
  request, ``false``, or several, ``true``), ``ckv_compute_thread_ops_total`` (ops run: ops ÷
  passes is the mean batch)
- ``ckv_compute_look_ahead_runs_total{where}``: policies' look-ahead work since start (``contiguous+``
  scoring layer ``l + 1`` while layer ``l`` runs), ``thread`` (a look-ahead thread ran it) or
  ``request`` (the request's own thread: no look-ahead thread, or it had not begun the work when the
  request needed it)
- ``ckv_compute_register_phase_seconds{phase}`` (``prefill``, ``store``),
  ``ckv_compute_stored_bytes_total``, ``ckv_compute_registrations_total{outcome}`` (``stored``,
  ``already_registered``)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    from prometheus_client.core import CounterMetricFamily
except ImportError as err:  # a base dependency, but some machines run without it
    raise ImportError("--metrics-port needs prometheus-client: pip install prometheus-client==0.26.0") from err

from contiguouskv.compute_server.admission import Admission
from contiguouskv.compute_server.kvio.identcache import IdentCache
from contiguouskv.compute_server.lookahead import LookAhead
from contiguouskv.compute_server.scheduler import SchedulerStats
from contiguouskv.v1 import compute_pb2

log = logging.getLogger(__name__)

PREFIX = "ckv_compute_"
SERVICE = "/contiguouskv.v1.ComputeService/"
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
LAYER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ComputeMetrics:
    """The compute server's metric families, in a registry of their own."""

    def __init__(self, ident_cache: IdentCache | None = None, admission: Admission | None = None,
                 scheduler: SchedulerStats | None = None, look_ahead: LookAhead | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        if scheduler is not None:
            r.register(_SchedulerCollector(scheduler))
        self.requests = Counter(PREFIX + "requests", "ComputeService RPCs by method and final status code.",
                                ["method", "code"], registry=r)
        self.duration = Histogram(PREFIX + "request_duration_seconds", "Wall time of ComputeService RPCs.",
                                  ["method"], buckets=SECONDS_BUCKETS, registry=r)
        self.inflight = Gauge(PREFIX + "inflight_requests", "ComputeService RPCs running now.", ["method"],
                              registry=r)
        self.ttft = Histogram(PREFIX + "ttft_seconds", "Re-Prefill time to first token, measured on the server.",
                              ["policy"], buckets=SECONDS_BUCKETS, registry=r)
        self.phase = Histogram(PREFIX + "reprefill_phase_seconds",
                               "Re-Prefill time per phase: io_wait, compute, fetch, decode.",
                               ["policy", "phase"], buckets=SECONDS_BUCKETS, registry=r)
        self.layer_wait = Histogram(PREFIX + "layer_io_wait_seconds", "Time one layer was blocked on its records.",
                                    ["policy"], buckets=LAYER_BUCKETS, registry=r)
        self.fetched = Counter(PREFIX + "fetched_bytes", "Bytes of prefix records received from cache servers.",
                               ["policy"], registry=r)
        self.generated = Counter(PREFIX + "generated_tokens", "Tokens returned (first tokens included).",
                                 registry=r)
        self.register_phase = Histogram(PREFIX + "register_phase_seconds",
                                        "Registration time per phase: prefill, store.", ["phase"],
                                        buckets=SECONDS_BUCKETS, registry=r)
        self.stored = Counter(PREFIX + "stored_bytes", "Bytes written to cache servers by registrations.",
                              registry=r)
        self.registrations = Counter(PREFIX + "registrations", "Successful registrations by outcome.",
                                     ["outcome"], registry=r)
        self.ident_bytes = Gauge(PREFIX + "ident_cache_bytes", "Identification data resident in the ident cache.",
                                 registry=r)
        self.ident_lookups = Gauge(PREFIX + "ident_cache_lookups", "Ident cache lookups since start, by result.",
                                   ["result"], registry=r)
        self.admitted = Gauge(PREFIX + "admission_requests", "Requests admitted (running) and queued for admission.",
                              ["state"], registry=r)
        self.staged = Gauge(PREFIX + "admission_staged_bytes",
                            "Staged-KV estimate of the running requests (admission's byte budget in use).", registry=r)
        if look_ahead is not None:
            r.register(_LookAheadCollector(look_ahead))
        if admission is not None:
            gate = admission
            self.admitted.labels("running").set_function(lambda: gate.snapshot().active)
            self.admitted.labels("queued").set_function(lambda: gate.snapshot().queued)
            self.staged.set_function(lambda: gate.snapshot().staged_bytes)
        if ident_cache is not None:
            cache = ident_cache
            self.ident_bytes.set_function(lambda: cache.stats().bytes)
            self.ident_lookups.labels("hit").set_function(lambda: cache.stats().hits)
            self.ident_lookups.labels("miss").set_function(lambda: cache.stats().misses)

    def observe_reprefill(self, reply: compute_pb2.ReprefillResponse) -> None:
        """Record the timings and bytes one Re-Prefill reply carries."""
        t, policy = reply.timings, reply.policy  # always the policy that ran
        self.ttft.labels(policy).observe(t.ttft_ms / 1e3)
        phases = (("io_wait", t.fetch_wait_ms), ("compute", t.compute_ms), ("fetch", t.fetch_ms),
                  ("decode", max(0.0, t.total_ms - t.ttft_ms)))
        for phase, ms in phases:
            self.phase.labels(policy, phase).observe(ms / 1e3)
        layer_wait = self.layer_wait.labels(policy)
        for layer in t.layers:
            layer_wait.observe(layer.wait_ms / 1e3)
        self.fetched.labels(policy).inc(reply.bytes_fetched)
        self.generated.inc(1 + len(reply.generated_ids))

    def observe_register(self, reply: compute_pb2.RegisterPrefixResponse) -> None:
        """Record one successful registration."""
        self.registrations.labels("already_registered" if reply.already_registered else "stored").inc()
        if not reply.already_registered:
            self.register_phase.labels("prefill").observe(reply.prefill_ms / 1e3)
            self.register_phase.labels("store").observe(reply.store_ms / 1e3)
            self.stored.inc(reply.bytes_stored)

    def observe_reply(self, method: str, reply: object) -> None:
        if isinstance(reply, compute_pb2.ReprefillResponse):
            self.observe_reprefill(reply)
        elif isinstance(reply, compute_pb2.RegisterPrefixResponse):
            self.observe_register(reply)
        elif isinstance(reply, compute_pb2.GenerateResponse) and reply.HasField("summary"):
            self.observe_reprefill(reply.summary)


class _SchedulerCollector:
    """The compute thread's counters (:class:`SchedulerStats`), read at every scrape."""

    def __init__(self, stats: SchedulerStats) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []  # no fixed samples to check for clashes at registration

    def collect(self) -> Any:
        s = self._stats
        busy = CounterMetricFamily(PREFIX + "thread_busy_seconds", "Seconds the compute thread ran model ops.")
        busy.add_metric([], s.busy_s)
        passes = CounterMetricFamily(PREFIX + "thread_passes", "Passes of the compute thread, by whether they "
                                     "served several requests.", labels=["batched"])
        passes.add_metric(["true"], s.batched_passes)
        passes.add_metric(["false"], s.passes - s.batched_passes)
        ops = CounterMetricFamily(PREFIX + "thread_ops", "Model ops run by the compute thread (one per request "
                                  "per pass).")
        ops.add_metric([], s.ops)
        yield from (busy, passes, ops)


class _LookAheadCollector:
    """Where policies' look-ahead work ran (:class:`LookAhead`), read at every scrape."""

    def __init__(self, look_ahead: LookAhead) -> None:
        self._look_ahead = look_ahead

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        s = self._look_ahead.stats()
        runs = CounterMetricFamily(PREFIX + "look_ahead_runs", "Policies' look-ahead work (contiguous+ scoring layer "
                                   "l+1 while l runs) by the thread that ran it: thread (a look-ahead thread) or "
                                   "request (the request's own).", labels=["where"])
        runs.add_metric(["thread"], s.on_thread)
        runs.add_metric(["request"], s.on_request)
        yield runs


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the call ended with, by name."""
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and reads the replies of ComputeService RPCs into a :class:`ComputeMetrics`."""

    def __init__(self, metrics: ComputeMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE):
            return handler
        method = details.method[len(SERVICE):]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            started = self._start(method)
            try:
                reply = await behavior(request, context)
                self._metrics.observe_reply(method, reply)
                return reply
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(method, started, _code(context, error))

        return observed

    def _stream(self, method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            started = self._start(method)
            try:
                async for reply in behavior(request, context):
                    self._metrics.observe_reply(method, reply)
                    yield reply
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(method, started, _code(context, error))

        return observed

    def _start(self, method: str) -> float:
        self._metrics.inflight.labels(method).inc()
        return time.perf_counter()

    def _end(self, method: str, started: float, code: str) -> None:
        self._metrics.inflight.labels(method).dec()
        self._metrics.duration.labels(method).observe(time.perf_counter() - started)
        self._metrics.requests.labels(method, code).inc()


def start_metrics_server(host: str, port: int, metrics: ComputeMetrics) -> WSGIServer:
    """Serve ``metrics`` at ``http://host:port/metrics`` on a daemon thread; port 0 binds a free one
    (logged). Stop it with ``shutdown()``."""
    httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, httpd.server_port)
    return httpd
