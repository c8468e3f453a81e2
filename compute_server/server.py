"""Compute server process: flags -> config (:mod:`.flags`), load the model, serve ComputeService until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import grpc
import torch

from contiguouskv.common import telemetry
from contiguouskv.common.access import access_interceptor
from contiguouskv.common.logs import setup_logging, stderr_to_log
from contiguouskv.common.malloc import keep_freed_buffers
from contiguouskv.common.security import read_token_file, server_credentials
from contiguouskv.common.serving import ServerLifecycle, run_async, run_main, server_options
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.config import ComputeServerConfig
from contiguouskv.compute_server.core import ComputeCore
from contiguouskv.compute_server.flags import add_arguments, config_from_args
from contiguouskv.compute_server.layouts.tensors import TORCH_DTYPES
from contiguouskv.compute_server.model.loading import load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.policies.registry import PolicyRegistry
from contiguouskv.compute_server.servicer import METHOD_SCOPES, ComputeServicer
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.001
"""The interpreter's switch interval in the compute server (Python's default: 0.005)."""


def _resolve_device(config: ComputeServerConfig) -> tuple[str, str]:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


async def serve(config: ComputeServerConfig) -> int:
    policies = PolicyRegistry.with_plugins(config.policy_plugins)  # a bad plugin fails before the model loads
    device, dtype = _resolve_device(config)
    log.info("loading model %s on %s (%s)", config.model, device, dtype)
    with stderr_to_log(log):  # the loaders' progress bars: log lines, not terminal drawing
        model = load_model(config.model, cache_dir=config.resolved_cache_dir(), dtype=TORCH_DTYPES[dtype],
                           device=device)
    token = read_token_file(config.cache_token_file) if config.cache_token_file is not None else None
    cache = CacheClient(config.cache, config.max_message_bytes, config.rpc_timeout_s,
                        config.replication, config.write_quorum, config.cache_refresh_s,
                        tls=config.cache_tls(), token=token, data_path=config.data_path,
                        shm_socket=config.shm_socket, shm_slots=config.shm_slots,
                        shm_slot_bytes=config.shm_slot_bytes)
    await cache.start()
    core = ComputeCore(config, model, ModelRunner(model), cache, policies)
    interceptors, metrics = telemetry.server_interceptors(), None
    if config.metrics_port is not None:
        from contiguouskv.compute_server.observability.metrics import (  # optional: prometheus_client
            ComputeMetrics, MetricsInterceptor, start_metrics_server,
        )

        observed = ComputeMetrics(core.ident_cache, core.admission, core.scheduler.stats, core.look_ahead)
        interceptors.append(MetricsInterceptor(observed))
        metrics = start_metrics_server(config.host, config.metrics_port, observed)
    # Last, so tracing and the request metrics see refused calls with their status.
    access = access_interceptor(METHOD_SCOPES, config.auth_tokens_file, config.max_streams_per_client)
    if access is not None:
        interceptors.append(access)
    server = grpc.aio.server(options=server_options(config.max_message_bytes), interceptors=interceptors or None)
    compute_pb2_grpc.add_ComputeServiceServicer_to_server(ComputeServicer(core, device), server)
    lifecycle = ServerLifecycle(server, [compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name])
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    try:
        await lifecycle.start(config.host, config.port, config.port_file, f"compute server ({model.name})",
                              credentials, config.health_port)
        await lifecycle.wait_and_drain(config.grace_seconds, lambda: core.begin_shutdown(config.grace_seconds))
    finally:
        await cache.close()
        core.close()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
    return 0


def run(config: ComputeServerConfig) -> int:
    """Serve until SIGTERM; tracing (service ``contiguouskv-compute``) is set up for the process here."""
    keep_freed_buffers(os.environ, max_arenas=2)  # reuse ~1 MiB Fetch buffers; bounded arenas (common/malloc.py)
    # Every torch op gives up the GIL and takes it back; while another thread runs Python (the event
    # loop parsing records, a request's look-ahead) each take can wait out the switch interval, 5 ms
    # by default: a request's layer loop of many small ops paid it op after op (docs/performance.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    with telemetry.tracing("contiguouskv-compute"):
        telemetry.instrument_aio_channels()  # the cache client's channels: RPC spans, W3C context out
        return run_async(serve(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contiguouskv.compute_server")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    return run_main(parser, lambda: config_from_args(args), run, "compute server")
