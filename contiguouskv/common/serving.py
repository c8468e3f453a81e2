"""Server lifecycle shared by both services: options, health, reflection, port file, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
    uvloop = None  # type: ignore[assignment]

from contiguouskv.common.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")
C = TypeVar("C")


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of both servers' gRPC server: message size limits, keepalive pings accepted every 5 s
    (the compute server's cache channels ping every 10 s during a call, to notice a shard whose node
    vanished without closing the connection; gRPC's default of 5 min would answer them with GOAWAY
    "too_many_pings"), and the port owned alone: gRPC sets SO_REUSEPORT by default, so a second
    server on a taken port would bind too and share the connections."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0)]


SERVING_FIELDS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file",
                          "max_streams_per_client", "health_port")


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags both servers share: TLS, tokens, per-client limit, health port (docs/security.md)."""
    a = parser.add_argument
    a("--tls-cert-file", type=Path, help="serve TLS with this certificate (PEM; with --tls-key-file)")
    a("--tls-key-file", type=Path, help="private key of --tls-cert-file (PEM)")
    a("--tls-client-ca-file", type=Path,
      help="mutual TLS: require client certificates signed by this CA bundle")
    a("--auth-tokens-file", type=Path,
      help="require bearer tokens: lines '<token> read|write|read,write [name]', re-read when changed")
    a("--max-streams-per-client", type=int,
      help="calls one client (token name@IP, else IP address) may have in flight; 0 = unlimited")
    a("--health-port", type=int,
      help="also serve only gRPC health, in plaintext, on this port (for probes that cannot speak TLS)")


def write_port_file(path: Path, port: int) -> None:
    """Write the bound port atomically so a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


class ServerLifecycle:
    """Health + reflection for ``service_names``; start, then wait for SIGTERM/SIGINT and drain."""

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]) -> None:
        self.server = server
        self.health = health.aio.HealthServicer()
        self.names = list(service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([*self.names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self._stop = asyncio.Event()
        self._what = "server"
        self._health_server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int, port_file: Path | None, what: str,
                    credentials: grpc.ServerCredentials | None = None, health_port: int | None = None) -> int:
        """Bind (TLS when ``credentials`` are given), start, report SERVING and write the port file.

        ``health_port``: a second, plaintext server on that port with only the health service (the
        same statuses), for Kubernetes gRPC probes, which cannot speak TLS.
        """
        self._what = what
        if health_port is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            if _bind(lambda: self._health_server.add_insecure_port(f"{host}:{health_port}")) == 0:
                raise OSError(f"cannot bind the health port {host}:{health_port}: in use or not an address here")
            await self._health_server.start()
            log.info("%s health checks (plaintext) on %s:%d", what, host, health_port)
        address = f"{host}:{port}"
        bound = _bind(lambda: self.server.add_secure_port(address, credentials) if credentials is not None
                      else self.server.add_insecure_port(address))
        if bound == 0:
            raise OSError(f"cannot bind {host}:{port}: in use (another server?) or not an address here")
        await self.server.start()
        for name in ["", *self.names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if port_file is not None:
            write_port_file(port_file, bound)
        log.info("%s listening on %s:%d (%s)", what, host, bound, "TLS" if credentials is not None else "plaintext")
        return bound

    async def wait_and_drain(self, grace_seconds: float, on_drain: Callable[[], None] | None = None) -> None:
        """Block until SIGTERM/SIGINT (or :meth:`request_stop`); then NOT_SERVING and a graceful stop.

        ``on_drain`` runs first (the compute server refuses queued work and bounds the running)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            log.info("%s draining: not serving new requests, %.1fs grace for in-flight ones",
                     self._what, grace_seconds)
            await self.health.enter_graceful_shutdown()
            if on_drain is not None:
                on_drain()
            await self.server.stop(grace_seconds)
            if self._health_server is not None:
                await self._health_server.stop(0)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("%s stopped", self._what)

    def request_stop(self) -> None:
        self._stop.set()


def run_main(parser: argparse.ArgumentParser, build: Callable[[], C], run: Callable[[C], int], what: str) -> int:
    """A server process's exit status: its config from ``build`` (a wrong or missing setting is a
    usage error naming it), then ``run``; a port, root or socket it cannot have (another server
    holds it) ends it with status 2 and one log line saying which, not a traceback."""
    try:
        config = build()
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        return run(config)
    except OSError as exc:
        log.error("%s cannot start: %s", what, exc)
        return 2


def _bind(add_port: Callable[[], int]) -> int:
    """The port ``add_port`` bound, 0 where it could not bind (grpc raises RuntimeError for that)."""
    try:
        return add_port()
    except RuntimeError:
        return 0


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run the coroutine ``main`` under uvloop when it is installed, else asyncio; return its result."""
    if uvloop is None:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)
