"""Distributed tracing for the CLI, the SDK and both servers, on OpenTelemetry when it is installed.

OpenTelemetry is optional (the ``otel`` extra). Without it every function here still works: tracers
hand out no-op spans, interceptor lists are empty, :func:`setup_tracing` does nothing. So servers
start and serve on machines that lack it.

Conventions (one place for them):

- The tracer provider is configured once, in ``main()``, by :func:`setup_tracing`, with
  ``service.name`` per process (``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` win when set),
  and only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-only variant) is set: spans are then
  exported over OTLP (``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` picks HTTP, else gRPC). A
  program using the SDK may install its own provider instead (before it creates clients).
- Tracing is :func:`active` only once a provider is installed; before that no RPC is
  instrumented and spans are no-ops, so an untraced process pays nothing per message.
- RPC spans come from the official gRPC instrumentation (:func:`server_interceptors`,
  :func:`aio_client_interceptors`, :func:`intercept_channel`), which also carries the W3C trace
  context in gRPC metadata. Health checks and reflection are not traced.
- Our own spans are named ``{verb} {object}`` (``run reprefill``, ``run layer``, ``serve fetch``,
  ``read records``, ``call reprefill``); their attribute keys are the ``ckv.*`` constants below.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)


def _optional_module(name: str) -> Any:
    """``importlib.import_module(name)``, or None when it is not installed (typed Any either way)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# The API alone is enough for spans; the SDK and the exporters are looked up in setup_tracing.
_otel_trace = _optional_module("opentelemetry.trace")

TRACER_SCOPE = "contiguouskv"
OTEL_EXTRA_HINT = "pip install 'contiguouskv[otel]'"

# --- span names ----------------------------------------------------------------------------------
SPAN_RUN_REPREFILL = "run reprefill"
SPAN_RUN_LAYER = "run layer"
SPAN_SERVE_FETCH = "serve fetch"
SPAN_READ_RECORDS = "read records"
SPAN_CALL = "call {}"  # SDK: "call register", "call reprefill", "call generate", "call model_info"

# --- attribute keys ------------------------------------------------------------------------------
ATTR_PREFIX_ID = "ckv.prefix_id"
ATTR_LAYOUT = "ckv.layout"
ATTR_POLICY = "ckv.policy"
ATTR_BUDGET = "ckv.budget"
ATTR_LAYER = "ckv.layer"
ATTR_PERIOD = "ckv.period"
ATTR_CHUNKS_SELECTED = "ckv.chunks_selected"
ATTR_IO_WAIT_MS = "ckv.io_wait_ms"
ATTR_COMPUTE_MS = "ckv.compute_ms"
ATTR_BYTES = "ckv.bytes"
ATTR_BYTES_IDENTIFICATION = "ckv.bytes_identification"
ATTR_IDENT_WAIT_MS = "ckv.ident_wait_ms"
ATTR_TTFT_MS = "ckv.ttft_ms"
ATTR_WAIT_MS = "ckv.wait_ms"  # a request's time blocked on records (K/V and identification)
ATTR_RESIDENT_COMPUTE_MS = "ckv.resident_compute_ms"  # with measure_floor: the compute floor
ATTR_OVERHEAD_MS = "ckv.overhead_ms"  # with measure_floor: ttft - waits - resident compute
ATTR_SELECTION_MS = "ckv.selection_ms"  # selecting chunks or tokens on the request's thread, waits excluded
ATTR_STAGING_MS = "ckv.staging_ms"  # gathering records into tensors, joining them with the query's K/V
ATTR_MODEL_MS = "ckv.model_ms"  # the model's own ops during the request
ATTR_PREFIX_TOKENS = "ckv.prefix_tokens"
ATTR_QUERY_TOKENS = "ckv.query_tokens"
ATTR_REGION = "ckv.region"
ATTR_RECORDS = "ckv.records"
ATTR_DRAM_RECORDS = "ckv.dram_records"
ATTR_BATCHES = "ckv.batches"
ATTR_SERVER_ADDRESS = "ckv.server.address"
ATTR_ATTEMPTS = "ckv.attempts"
ATTR_TOKENS = "ckv.tokens"

AttributeValue = str | bool | int | float | Sequence[str] | Sequence[int] | Sequence[float]
Attributes = Mapping[str, AttributeValue]


class Span(Protocol):
    """What our code does with a span (an OpenTelemetry span or a no-op one)."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def end(self, end_time: int | None = None) -> None: ...

    def is_recording(self) -> bool: ...


class _NoopSpan:
    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NOOP_SPAN: Span = _NoopSpan()


def available() -> bool:
    """True when the OpenTelemetry API is importable."""
    return _otel_trace is not None


class Tracer:
    """A tracer with a fixed scope name; spans are no-ops without OpenTelemetry or a provider."""

    def __init__(self, scope: str = TRACER_SCOPE) -> None:
        # A proxy until setup_tracing() sets the provider, then the real tracer.
        self._tracer: Any = _otel_trace.get_tracer(scope) if _otel_trace is not None else None

    @contextlib.contextmanager
    def span(self, name: str, attributes: Attributes | None = None) -> Iterator[Span]:
        """A span that is current for the ``with`` body; ended (with an error status) on exit."""
        if self._tracer is None:
            yield NOOP_SPAN
            return
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def start(self, name: str, attributes: Attributes | None = None, parent: Span | None = None,
              start_ns: int | None = None) -> Span:
        """A span the caller ends; child of ``parent`` (else of the current span), not made current."""
        if self._tracer is None:
            return NOOP_SPAN
        context = _otel_trace.set_span_in_context(parent) if parent is not None else None
        span: Span = self._tracer.start_span(name, context=context, attributes=attributes, start_time=start_ns)
        return span

    def record(self, name: str, start_ns: int, end_ns: int, attributes: Attributes,
               parent: Span | None = None) -> None:
        """A finished span with explicit times (for work measured elsewhere, e.g. on another thread)."""
        if self._tracer is not None:
            self.start(name, attributes, parent, start_ns).end(end_ns)


@contextlib.contextmanager
def use_span(span: Span) -> Iterator[None]:
    """Make ``span`` current for the ``with`` body without ending it (calls made inside are its children)."""
    if _otel_trace is None or not span.is_recording():
        yield
        return
    with _otel_trace.use_span(span, end_on_exit=False):
        yield


def mark_error(span: Span, error: BaseException) -> None:
    """Record ``error`` on ``span`` and give it an error status."""
    if _otel_trace is not None and span.is_recording():
        real: Any = span
        real.record_exception(error)
        real.set_status(_otel_trace.Status(_otel_trace.StatusCode.ERROR, str(error)[:200]))


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, or None outside any (valid) span."""
    if _otel_trace is None:
        return None
    ctx = _otel_trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


# --- gRPC instrumentation ------------------------------------------------------------------------
def _rpc_filter(grpc_otel: Any) -> Any:
    filters = importlib.import_module(grpc_otel.__name__ + ".filters")
    return filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))


def active() -> bool:
    """True once a tracer provider is installed (by :func:`setup_tracing` or by the program): only
    then are RPCs instrumented, so an untraced process pays nothing per message."""
    if _otel_trace is None:
        return False
    return not isinstance(_otel_trace.get_tracer_provider(),
                          (_otel_trace.ProxyTracerProvider, _otel_trace.NoOpTracerProvider))


def _instrumentation() -> Any:
    """The official gRPC instrumentation module when tracing is :func:`active`, else None."""
    return _optional_module("opentelemetry.instrumentation.grpc") if active() else None


def server_interceptors() -> list[Any]:
    """Interceptors for ``grpc.aio.server(interceptors=...)``: a server span per RPC (W3C context in)."""
    grpc_otel = _instrumentation()
    return [grpc_otel.aio_server_interceptor(filter_=_rpc_filter(grpc_otel))] if grpc_otel else []


def aio_client_interceptors() -> list[Any]:
    """Interceptors for ``grpc.aio.insecure_channel(interceptors=...)``: a client span per RPC, W3C out."""
    grpc_otel = _instrumentation()
    return list(grpc_otel.aio_client_interceptors(filter_=_rpc_filter(grpc_otel))) if grpc_otel else []


def intercept_channel(channel: Any) -> Any:
    """``channel`` (a blocking ``grpc.Channel``) with a client span per RPC and W3C context out."""
    grpc_otel = _instrumentation()
    if grpc_otel is None:
        return channel
    return grpc_otel.intercept_channel(channel, grpc_otel.client_interceptor(filter_=_rpc_filter(grpc_otel)))


def instrument_aio_channels() -> None:
    """From now on, every ``grpc.aio`` channel this process opens makes client spans and sends W3C
    context (the official instrumentor, for channels created in code we do not own); call once, in
    ``main()``."""
    grpc_otel = _instrumentation()
    if grpc_otel is not None:
        grpc_otel.GrpcAioInstrumentorClient(filter_=_rpc_filter(grpc_otel)).instrument()


# --- set-up, once per process --------------------------------------------------------------------
class TracingHandle:
    """What :func:`setup_tracing` installed; :meth:`shutdown` flushes and stops the exporter."""

    def __init__(self, provider: Any = None, exporting: bool = False) -> None:
        self._provider = provider
        self.exporting = exporting

    @property
    def active(self) -> bool:
        return self._provider is not None

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None


def _wants_export(env: Mapping[str, str]) -> bool:
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) and env.get("OTEL_TRACES_EXPORTER", "otlp").lower() != "none"


def _exporter(env: Mapping[str, str]) -> Any:
    """An OTLP span exporter (gRPC, or HTTP when the protocol says so); it reads the OTEL_* settings."""
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    kind = "http" if protocol.startswith("http") else "grpc"
    return importlib.import_module(f"opentelemetry.exporter.otlp.proto.{kind}.trace_exporter").OTLPSpanExporter()


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> TracingHandle:
    """Install the tracer provider for this process (call once, in ``main()``).

    Only when an OTLP endpoint is set: then spans are recorded and exported in batches. Without
    one, or with ``OTEL_SDK_DISABLED=true``, or without the OpenTelemetry SDK (a warning names the
    extra), nothing is installed and RPCs stay uninstrumented.
    """
    env = os.environ if env is None else env
    wants_export = _wants_export(env)
    sdk = _optional_module("opentelemetry.sdk.trace")
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or not wants_export:
        return TracingHandle()
    if sdk is None or _otel_trace is None:
        if wants_export:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed; no traces "
                        "(%s)", OTEL_EXTRA_HINT)
        return TracingHandle()
    resources = importlib.import_module("opentelemetry.sdk.resources")
    resource = resources.Resource.create({})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(resources.Resource({"service.name": service_name}))
    provider = sdk.TracerProvider(resource=resource)
    try:
        exporter = _exporter(env)
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is missing (%s)", OTEL_EXTRA_HINT)
        return TracingHandle()
    provider.add_span_processor(importlib.import_module("opentelemetry.sdk.trace.export").BatchSpanProcessor(exporter))
    _otel_trace.set_tracer_provider(provider)
    return TracingHandle(provider, exporting=True)


@contextlib.contextmanager
def tracing(service_name: str) -> Iterator[TracingHandle]:
    """:func:`setup_tracing` for the ``with`` body, then flush and shut the provider down."""
    handle = setup_tracing(service_name)
    try:
        yield handle
    finally:
        handle.shutdown()
