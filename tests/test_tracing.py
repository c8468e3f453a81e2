"""One trace per request across client, compute and cache processes; servers without OpenTelemetry.

The multi-process test runs an OTLP trace receiver in this process (opentelemetry-proto's
TraceServiceServicer on 127.0.0.1:0), points the servers and a CLI client at it with the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``, and checks what arrives: one trace id for the query, the parent
chain from the client's call down to the cache server's disk reads, and one span per layer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.proto")

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from contiguouskv import launch  # noqa: E402
from contiguouskv.client import ContiguousKVClient  # noqa: E402
from contiguouskv.common import telemetry  # noqa: E402

# Runs module argv[1] with its other arguments as if OpenTelemetry and prometheus-client were not
# installed (as on the GPU machines).
BLOCK_OPTIONAL = """
import importlib.abc, runpy, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("opentelemetry", "prometheus_client"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Missing())
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(ReceivedSpan(
                            service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                            s.start_time_unix_nano, s.end_time_unix_nano,
                            {a.key: _value(a.value) for a in s.attributes}))
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 30.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if done(spans):
                return spans
            time.sleep(0.1)
        raise AssertionError(f"spans did not arrive in {timeout}s; got {sorted({(s.service, s.name) for s in spans})}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, f"http://127.0.0.1:{port}"
    server.stop(None)


def _otel_env(endpoint: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def _ckv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contiguouskv", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_one_trace_from_client_through_compute_to_cache(receiver: tuple[Receiver, str], tmp_path: Path) -> None:
    rec, endpoint = receiver
    env = _otel_env(endpoint)
    cache = launch.ServiceProcess("contiguouskv.cache_server", ["--root", str(tmp_path / "store")], env=env)
    with cache:
        compute = launch.ServiceProcess("contiguouskv.compute_server",
                                        ["--model", "random:tiny", "--cache", cache.address, "--dtype", "float32",
                                         "--log-format", "json"], env=env)
        with compute:
            with ContiguousKVClient(compute.address, timeout=60) as client:  # untraced: no provider here
                prefix = client.register(token_ids=list(range(5, 90))).prefix_id
            out = _ckv("query", "--server", compute.address, "--prefix", prefix, "--token-ids", "3,4,5",
                       "--policy", "contiguous", "--budget", "0.5", "--period", "2", "--json", env=env)
            assert out.returncode == 0, out.stderr
            answer = json.loads(out.stdout)
            layers = answer["timings"]["layers"]

            def complete(spans: list[ReceivedSpan]) -> bool:
                names = [(s.service, s.name) for s in spans]
                if not (("contiguouskv-cli", "call reprefill") in names
                        and names.count(("contiguouskv-compute", "run layer")) >= len(layers)):
                    return False
                # A disk read's spans arrive before the stream-long spans above them ("serve fetch",
                # the Fetch call on both sides), which end when the compute server closes the stream:
                # wait until one read's whole parent chain is here.
                by_id = {s.span_id: s for s in spans}
                for read in (s for s in spans if s.name == telemetry.SPAN_READ_RECORDS):
                    span = read
                    while span.parent_id and span.parent_id in by_id:
                        span = by_id[span.parent_id]
                    if not span.parent_id:
                        return True
                return False

            spans = rec.wait_for(complete)
            compute_log = compute.log_tail(200)

    client_spans = [s for s in spans if s.service == "contiguouskv-cli"]
    (root,) = [s for s in client_spans if s.name == "call reprefill"]
    assert root.parent_id == "" and root.attributes[telemetry.ATTR_PREFIX_ID] == prefix
    trace = [s for s in spans if s.trace_id == root.trace_id]
    assert {s.trace_id for s in client_spans} == {root.trace_id}, "the client process made one trace"
    assert {s.service for s in trace} == {"contiguouskv-cli", "contiguouskv-compute", "contiguouskv-cache"}
    (reprefill,) = [s for s in spans if s.name == telemetry.SPAN_RUN_REPREFILL]
    assert reprefill.trace_id == root.trace_id, "the compute server's work joined the client's trace"

    # The parent chain from a disk read on the cache server up to the client's call.
    by_id = {s.span_id: s for s in trace}
    read = next((s for s in trace if s.name == telemetry.SPAN_READ_RECORDS), None)
    assert read is not None, f"no disk read in the client's trace: {sorted({(s.service, s.name) for s in trace})}"
    chain, span = [], read
    while span is not None:
        chain.append((span.service, span.name))
        span = by_id.get(span.parent_id) if span.parent_id else None
    assert chain == [
        ("contiguouskv-cache", "read records"),
        ("contiguouskv-cache", "serve fetch"),
        ("contiguouskv-cache", "/contiguouskv.v1.CacheService/Fetch"),
        ("contiguouskv-compute", "/contiguouskv.v1.CacheService/Fetch"),
        ("contiguouskv-compute", "run reprefill"),
        ("contiguouskv-compute", "/contiguouskv.v1.ComputeService/Reprefill"),
        ("contiguouskv-cli", "/contiguouskv.v1.ComputeService/Reprefill"),
        ("contiguouskv-cli", "call reprefill"),
    ], chain

    # One span per layer under `run reprefill`, carrying the layer's numbers from the response.
    layer_spans = sorted((s for s in trace if s.name == telemetry.SPAN_RUN_LAYER),
                         key=lambda s: s.attributes[telemetry.ATTR_LAYER])
    assert [s.parent_id for s in layer_spans] == [reprefill.span_id] * len(layers)
    for span, timing in zip(layer_spans, layers):
        a = span.attributes
        assert a[telemetry.ATTR_LAYER] == timing["layer"]
        assert a[telemetry.ATTR_PERIOD] == timing["layer"] // 2
        assert a[telemetry.ATTR_IO_WAIT_MS] == pytest.approx(timing["wait_ms"])
        assert a[telemetry.ATTR_COMPUTE_MS] == pytest.approx(timing["compute_ms"])
        assert a[telemetry.ATTR_BYTES] == timing["bytes"] > 0
        assert 0 < a[telemetry.ATTR_CHUNKS_SELECTED] <= answer["num_chunks"]
        assert reprefill.start_ns <= span.start_ns < span.end_ns <= reprefill.end_ns
    assert all(a.end_ns <= b.start_ns + 1000 for a, b in zip(layer_spans, layer_spans[1:])), "layers in order"

    # The compute server's JSON log line for this request carries the trace id.
    lines = [json.loads(line) for line in compute_log.splitlines() if line.startswith("{")]
    assert any(line.get("trace_id") == root.trace_id and line.get("prefix_id") == prefix for line in lines)


def _blocked(module: str, *args: str) -> list[str]:
    return [sys.executable, "-c", BLOCK_OPTIONAL, module, *args]


def test_servers_and_cli_work_without_opentelemetry_or_prometheus(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}  # asked for, cannot be had
    port_files = {name: tmp_path / f"{name}.port" for name in ("cache", "compute")}
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in port_files}
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, module: str, *args: str) -> str:
        procs.append(subprocess.Popen(
            _blocked(module, *args, "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_files[name])),
            stdout=logs[name], stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 60
        while not port_files[name].exists():
            assert procs[-1].poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
            time.sleep(0.05)
        return f"127.0.0.1:{int(port_files[name].read_text())}"

    try:
        cache = start("cache", "contiguouskv.cache_server", "--root", str(tmp_path / "store"))
        compute = start("compute", "contiguouskv.compute_server", "--model", "random:tiny", "--cache", cache,
                        "--dtype", "float32")
        reg = subprocess.run(_blocked("contiguouskv", "register", "--server", compute, "--token-ids",
                                      ",".join(map(str, range(40))), "--json"),
                             capture_output=True, text=True, timeout=120, env=env)
        assert reg.returncode == 0, reg.stderr
        prefix = json.loads(reg.stdout)["prefix_id"]
        query = subprocess.run(_blocked("contiguouskv", "query", "--server", compute, "--prefix", prefix,
                                        "--token-ids", "1,2", "--policy", "full", "--json"),
                               capture_output=True, text=True, timeout=120, env=env)
        assert query.returncode == 0, query.stderr
        assert json.loads(query.stdout)["bytes_fetched"] > 0
        assert "OpenTelemetry is not installed" in reg.stderr  # the CLI said why there are no traces
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(30) == 0
        for log in logs.values():
            log.close()
    for name in ("cache", "compute"):
        text = (tmp_path / f"{name}.log").read_text()
        assert "OpenTelemetry is not installed" in text and "Traceback" not in text, text


# --- in-process: per-layer spans and log lines ----------------------------------------------------
@pytest.fixture(scope="module")
def memory_spans() -> Iterator[Any]:
    """An in-memory exporter on this process's tracer provider (installed once, if none is)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    exporter = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
    yield exporter
    exporter.shutdown()


def test_layer_spans_are_placed_at_the_measured_times(memory_spans: Any) -> None:
    from contiguouskv.compute_server.engine import LayerRun
    from contiguouskv.compute_server.observability.tracing import record_layers, tracer

    memory_spans.clear()
    t0 = time.perf_counter()
    layers = [LayerRun(0, 0.002, 0.001, t0), LayerRun(1, 0.0, 0.004, t0 + 0.003),
              LayerRun(2, 0.001, 0.001, t0 + 0.007)]
    usage = SimpleNamespace(periods=[SimpleNamespace(period=0, first_layer=0, num_layers=2),
                                     SimpleNamespace(period=1, first_layer=2, num_layers=2)],
                            layer_chunks=(3, 3, 5), layer_bytes=(300, 300, 500), layer_identification=(10, 0, 10),
                            layer_ident_wait=(0.0, 0.0, 0.0005))
    result = SimpleNamespace(outcome=SimpleNamespace(layers=layers), usage=usage)
    with tracer.span("run reprefill") as parent:
        record_layers(parent, result)  # type: ignore[arg-type]
    spans = {s.name: s for s in memory_spans.get_finished_spans() if s.name == "run reprefill"}
    layer_spans = [s for s in memory_spans.get_finished_spans() if s.name == "run layer"]
    assert len(layer_spans) == 3 and all(s.parent.span_id == spans["run reprefill"].context.span_id
                                         for s in layer_spans)
    first, second, third = sorted(layer_spans, key=lambda s: s.attributes[telemetry.ATTR_LAYER])
    assert (second.start_time - first.start_time) == pytest.approx(3e6, abs=2e3)  # 3 ms apart, in ns
    assert (first.end_time - first.start_time) == pytest.approx(3e6, abs=2e3)
    assert dict(third.attributes) == {
        telemetry.ATTR_LAYER: 2, telemetry.ATTR_PERIOD: 1, telemetry.ATTR_CHUNKS_SELECTED: 5,
        telemetry.ATTR_IO_WAIT_MS: pytest.approx(1.0), telemetry.ATTR_COMPUTE_MS: pytest.approx(1.0),
        telemetry.ATTR_BYTES: 500, telemetry.ATTR_BYTES_IDENTIFICATION: 10,
        telemetry.ATTR_IDENT_WAIT_MS: pytest.approx(0.5)}


def test_json_log_lines_carry_the_current_trace(memory_spans: Any) -> None:
    from contiguouskv.common.logs import JsonFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    with telemetry.Tracer().span("handle request"):
        trace_id, span_id = telemetry.current_trace_ids()  # type: ignore[misc]
        line = json.loads(JsonFormatter().format(record))
    assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and re.fullmatch(r"[0-9a-f]{16}", span_id)


def test_what_libraries_print_while_a_server_loads_becomes_json_lines() -> None:
    """Model loading draws progress bars on stderr; a JSON log must stay one object per line."""
    import io

    from tqdm import tqdm

    from contiguouskv.common.logs import JsonFormatter, stderr_to_log

    out = io.StringIO()
    handler = logging.StreamHandler(out)  # made before, like the server's: keeps its own stream
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ckv-test-stderr")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with stderr_to_log(logger):
            for _ in tqdm(range(50), desc="Loading weights", mininterval=0):
                pass
            print("UserWarning: a library warning", file=sys.stderr)  # as warnings' default hook prints
            sys.stderr.write("no newline at the end")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON
    messages = [line["message"] for line in lines]
    assert sum("Loading weights" in m for m in messages) == 1 and "50/50" in messages[0]
    assert any("a library warning" in m for m in messages)
    assert messages[-1] == "no newline at the end"


def test_grpc_s_client_gone_error_becomes_one_warning_line() -> None:
    """grpc's asyncio server logs a response it could not send to a client that had cancelled as an
    ERROR with a traceback; the servers' logging makes it one WARNING line, and leaves other grpc
    errors alone."""
    from contiguouskv.common.logs import ClientGoneFilter

    try:
        raise RuntimeError("Failed \"execute_batch\"")
    except RuntimeError:
        exc = sys.exc_info()
    gone = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "server.pyx", 710,
                             "ExecuteBatchError raised in core by servicer method [%s]",
                             ("/contiguouskv.v1.ComputeService/Reprefill",), exc)
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "server.pyx", 1, "Unexpected [%s] raised",
                              ("ValueError",), exc)
    rule = ClientGoneFilter()
    assert rule.filter(gone) and rule.filter(other)
    assert (gone.levelname, gone.exc_info) == ("WARNING", None)
    assert gone.getMessage() == ("[/contiguouskv.v1.ComputeService/Reprefill]: the client left before the response "
                                 "was sent (grpc: ExecuteBatchError)")
    assert (other.levelname, other.getMessage(), other.exc_info) == ("ERROR", "Unexpected [ValueError] raised", exc)


def test_span_conventions() -> None:
    names = [v for k, v in vars(telemetry).items() if k.startswith("SPAN_")]
    assert all(re.fullmatch(r"[a-z_]+ (\{\}|[a-z_]+)", n) for n in names), names  # "{verb} {object}"
    keys = [v for k, v in vars(telemetry).items() if k.startswith("ATTR_")]
    assert all(k.startswith("ckv.") for k in keys) and len(set(keys)) == len(keys)


def test_tracing_is_on_only_with_an_endpoint() -> None:
    code = (
        "from opentelemetry import trace\n"
        "from contiguouskv.common import telemetry as t\n"
        "h = t.setup_tracing('ckv-test', {})\n"
        "assert not h.active and not t.active() and t.server_interceptors() == [] == t.aio_client_interceptors()\n"
        "h = t.setup_tracing('ckv-test', {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9'})\n"
        "assert h.active and h.exporting and t.active() and len(t.server_interceptors()) == 1\n"
        "assert len(t.aio_client_interceptors()) == 4\n"
        "print(trace.get_tracer_provider().resource.attributes['service.name'])\n"
        "h.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert out.returncode == 0 and out.stdout.strip() == "ckv-test", out.stderr
    named = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "OTEL_SERVICE_NAME": "from-env"})
    assert named.stdout.strip() == "from-env", named.stderr
