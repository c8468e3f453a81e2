"""Running the cache server: flags, config, the grpc.aio server, health, graceful shutdown.

``python -m contiguouskv.cache_server --root DIR --port 0 --port-file F`` (or the ``contiguouskv``
CLI, through :func:`add_arguments`, :func:`config_from_args` and :func:`run`) starts a server
that writes its bound port to ``F`` once it accepts calls, and on SIGTERM or SIGINT reports
NOT_SERVING, lets in-flight calls finish for ``grace_seconds`` and exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.eviction import DEFAULT_EVICTION_RULE, EVICTION_RULES
from contiguouskv.cache_server.fetch import DISK_BYTES_PER_PAYLOAD_BYTE
from contiguouskv.cache_server.read_process import ENGINES as READ_ENGINES, ReadProcesses
from contiguouskv.cache_server.rootlock import hold_root
from contiguouskv.cache_server.shm_plane import PlaneServer
from contiguouskv.cache_server.service import METHOD_SCOPES, SERVICE_NAME, CacheServicer, add_cache_service
from contiguouskv.cache_server.store import RecordStore
from contiguouskv.common import telemetry
from contiguouskv.common.access import AccessInterceptor, access_interceptor
from contiguouskv.common.config import load_config
from contiguouskv.common.logs import setup_logging
from contiguouskv.common.malloc import keep_freed_buffers
from contiguouskv.common.security import server_credentials
from contiguouskv.common.serving import (
    SERVING_FIELDS, ServerLifecycle, add_serving_arguments, run_async, run_main, server_options,
)

logger = logging.getLogger(__name__)

# Config fields under their old names, still read from a config file and CKV_* env (deprecated).
RENAMED_FIELDS = {"cache_policy": "eviction_rule"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the cache server's flags to ``parser``; flags left out read as ``None`` (not given)."""
    parser.add_argument("--root", type=Path, help="directory of stored objects (required)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 = any free port (default 0)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--max-batch-bytes", type=int, help="payload cap of a Fetch response")
    parser.add_argument("--max-store-bytes", type=int, help="cap of stored bytes; 0 = unlimited")
    parser.add_argument("--dram-cache-bytes", type=int, help="DRAM cache budget; 0 = no cache (1 GiB)")
    parser.add_argument("--eviction-rule", choices=sorted(EVICTION_RULES),
                        help=f"which records the DRAM cache keeps ({DEFAULT_EVICTION_RULE})")
    # The flag's old name, still read (deprecated; left out of --help).
    parser.add_argument("--cache-policy", dest="eviction_rule", choices=sorted(EVICTION_RULES),
                        help="deprecated name of --eviction-rule")
    parser.add_argument("--max-inflight-bytes", type=int,
                        help="record bytes one Fetch stream may hold (16 MiB)")
    parser.add_argument("--read-threads", type=int, help="disk read threads (16)")
    parser.add_argument("--read-processes", type=int,
                        help="helper processes making the Fetch reads, the read threads shared among them "
                             "(1; 0 = read in the server's own threads)")
    parser.add_argument("--read-engine", choices=READ_ENGINES,
                        help="how helpers read O_DIRECT files: aio (Linux native AIO, the default) or threads")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (0 = any free port; off if absent)")
    parser.add_argument("--shm-socket",
                        help="Unix socket on which co-located compute servers open a shared-memory data plane "
                             "(off if absent; docs/deploy.md)")
    add_serving_arguments(parser)
    parser.add_argument("--config", type=Path, help="JSON file of config fields")
    # SUPPRESS: as a subcommand, an absent flag must not overwrite the parent parser's value.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="log line format (text)")


def config_from_args(args: argparse.Namespace) -> CacheServerConfig:
    """Resolve the config from flags > ``CKV_*`` env > ``--config`` file; ``ConfigError`` if bad."""
    flags = {
        name: getattr(args, name, None)
        for name in ("root", "host", "port", "port_file", "max_batch_bytes", "max_store_bytes",
                     "dram_cache_bytes", "eviction_rule", "max_inflight_bytes", "read_threads",
                     "read_processes", "read_engine", "metrics_port", "shm_socket", *SERVING_FIELDS)
    }
    return load_config(CacheServerConfig, flags=flags, file=args.config, renamed=RENAMED_FIELDS)


def _build_server(config: CacheServerConfig, store: RecordStore, cache: DramCache, read_pool: ThreadPoolExecutor,
                  access: AccessInterceptor | None, helpers: ReadProcesses | None,
                  planes: PlaneServer | None) -> ServerLifecycle:
    """The gRPC server with the cache, health and reflection services (access checks last, so
    tracing sees refused calls)."""
    interceptors = telemetry.server_interceptors() + ([access] if access is not None else [])
    server = grpc.aio.server(options=server_options(config.max_message_bytes), interceptors=interceptors or None)
    servicer = CacheServicer(store, read_pool, config.max_batch_bytes, cache,
                             config.max_inflight_bytes, helpers, planes)
    add_cache_service(servicer, server)
    return ServerLifecycle(server, [SERVICE_NAME])


async def serve(config: CacheServerConfig, ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain for ``grace_seconds`` and return.

    ``ready`` is called with the bound port once the server accepts calls (after the port file
    is written). Health reports SERVING for "" and the cache service until the drain starts.
    """
    with hold_root(config.root):  # before recovery: it must not run on a root another server writes
        await _serve_store(config, ready)


async def _serve_store(config: CacheServerConfig, ready: Callable[[int], None] | None) -> None:
    store = await asyncio.to_thread(RecordStore, config)
    # With a shared-memory plane the DRAM cache keeps records in per-object shared arenas, so that
    # co-located clients read its hits in place (cache_server/dram_arena.py); each holds a descriptor,
    # so the soft limit on descriptors goes up to the hard one (an arena that cannot be made leaves
    # its object uncached: counted as rejections)
    if config.shm_socket:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cache = DramCache(config.dram_cache_bytes, config.eviction_rule, store.counters, shared=bool(config.shm_socket))
    logger.info("DRAM cache: %d bytes%s, eviction rule %s; reads %s", config.dram_cache_bytes,
                " in shared arenas" if cache.shared else "", config.eviction_rule,
                "O_DIRECT" if store.direct_io else "buffered (no O_DIRECT)")
    access = access_interceptor(METHOD_SCOPES, config.auth_tokens_file, config.max_streams_per_client)
    metrics = None
    if config.metrics_port is not None:
        from contiguouskv.cache_server.metrics import CacheCollector, start_metrics_server  # optional: prometheus_client

        collector = CacheCollector(lambda: store.stats(cache), store.counters.latency,
                                   (lambda: dict(access.refusals)) if access is not None else dict)
        metrics = start_metrics_server(config.host, config.metrics_port, collector)
    helpers = await _start_helpers(config)
    planes = PlaneServer(config.shm_socket, store.counters, helpers, cache) if config.shm_socket else None
    try:
        if planes is not None:
            planes.start()
        with ThreadPoolExecutor(config.read_threads, thread_name_prefix="ckv-read") as read_pool:
            lifecycle = _build_server(config, store, cache, read_pool, access, helpers, planes)
            credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
            port = await lifecycle.start(config.host, config.port, config.port_file, "cache server", credentials,
                                         config.health_port)
            if ready is not None:
                ready(port)
            await lifecycle.wait_and_drain(config.grace_seconds)
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if helpers is not None:
            helpers.close()
        if planes is not None:
            planes.close()


HELPER_SLOTS = 32  # batches read by helpers at once, over all streams (more wait for the read pool)


async def _start_helpers(config: CacheServerConfig) -> ReadProcesses | None:
    """The helper processes for Fetch reads, started; ``None`` (reads in threads) if off or impossible."""
    if not config.read_processes:
        return None
    threads = max(1, config.read_threads // config.read_processes)
    try:
        helpers = ReadProcesses(config.read_processes, threads, HELPER_SLOTS,
                                DISK_BYTES_PER_PAYLOAD_BYTE * config.max_batch_bytes, config.read_engine)
    except OSError as exc:
        logger.warning("no helper processes for reads (%s); reading in the server's threads", exc)
        return None
    try:
        helpers.start()
        await helpers.ready()
    except (OSError, asyncio.TimeoutError) as exc:
        logger.warning("helper processes for reads did not start (%r); reading in the server's threads", exc)
        helpers.close()
        return None
    return helpers


def run(config: CacheServerConfig) -> int:
    """Run :func:`serve` on uvloop (plain asyncio where uvloop is missing); return 0.

    Tracing (service ``contiguouskv-cache``) is set up for the process here.
    """
    keep_freed_buffers(os.environ)  # reuse the ~1 MiB response buffers (common/malloc.py)
    with telemetry.tracing("contiguouskv-cache"):
        run_async(serve(config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m contiguouskv.cache_server``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m contiguouskv.cache_server", description="ContiguousKV cache server"
    )
    add_arguments(parser)
    parser.set_defaults(log_level="INFO", log_format="text")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run_main(parser, lambda: config_from_args(args), run, "cache server")
