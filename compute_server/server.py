"""Compute server process: flags -> config, load the model, serve ComputeService until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os

from contiguouskv.common import telemetry
from contiguouskv.common.access import access_interceptor
from contiguouskv.common.config import load_config
from contiguouskv.common.malloc import keep_freed_buffers
from contiguouskv.common.security import read_token_file, server_credentials
from contiguouskv.common.serving import (
    SERVING_FIELDS, ServerLifecycle, add_serving_arguments, channel_options, run_async,
)
from contiguouskv.compute_server.config import ComputeServerConfig

# Model code (torch, transformers) is imported inside serve(): the CLI builds its parser from
# add_arguments() on machines that only run the storage node.

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="random:<preset>, qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct, "
                        "or a Hugging Face model folder (env CKV_MODEL)")
    parser.add_argument("--cache", help="cache server address(es) HOST:PORT[,HOST:PORT...], or dns:///NAME:PORT for "
                        "every address NAME resolves to (a headless Service) (env CKV_CACHE)")
    parser.add_argument("--replication", type=int,
                        help="cache shards per prefix (default 2 where >= 2 shards, else 1) (env CKV_REPLICATION)")
    parser.add_argument("--write-quorum", type=int,
                        help="replicas that must commit a registration (default a majority) (env CKV_WRITE_QUORUM)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 0)")
    parser.add_argument("--port-file", help="write the bound port to this file once serving")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (0 = any free port; off if absent) "
                        "(env CKV_METRICS_PORT)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="compute device (default auto)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"),
                        help="compute and KV dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--model-cache-dir", help="where converted models are kept (default ~/.cache/contiguouskv)")
    parser.add_argument("--chunk-size", type=int, help="tokens per ContiguousChunk at registration (default 16)")
    parser.add_argument("--threads", type=int,
                        help="torch compute threads; 0 = torch's default (on a small shared CPU, 1 avoids "
                        "OpenMP oversubscription with the I/O threads) (env CKV_THREADS)")
    add_serving_arguments(parser)
    parser.add_argument("--cache-tls-ca-file", help="reach the cache servers over TLS, trusting this CA bundle")
    parser.add_argument("--cache-tls-cert-file", help="mutual TLS to the cache: this client certificate (PEM)")
    parser.add_argument("--cache-tls-key-file", help="key of --cache-tls-cert-file (PEM)")
    parser.add_argument("--cache-tls-server-name", help="name the cache servers' certificates carry, if not their host")
    parser.add_argument("--cache-token-file", help="bearer token (read,write scopes) sent to the cache servers")
    parser.add_argument("--config", help="JSON file with any of the above (flags win, then CKV_* env)")
    # Also accepted after the subcommand; the top-level CLI owns the defaults.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="log line format (text)")


def config_from_args(args: argparse.Namespace) -> ComputeServerConfig:
    flags = {k: getattr(args, k, None) for k in
             ("model", "cache", "replication", "write_quorum", "host", "port", "port_file", "device", "dtype",
              "model_cache_dir", "chunk_size", "metrics_port", "threads", *SERVING_FIELDS,
              "cache_tls_ca_file", "cache_tls_cert_file", "cache_tls_key_file", "cache_tls_server_name",
              "cache_token_file")}
    return load_config(ComputeServerConfig, flags, file=getattr(args, "config", None))


def _resolve_device(config: ComputeServerConfig) -> tuple[str, str]:
    import torch

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
    import grpc

    from contiguouskv.compute_server.cachenet.cache_client import CacheClient
    from contiguouskv.compute_server.core import ComputeCore
    from contiguouskv.compute_server.model.loading import load_model
    from contiguouskv.compute_server.layouts.packing import TORCH_DTYPES
    from contiguouskv.compute_server.model.runner import ModelRunner
    from contiguouskv.compute_server.servicer import METHOD_SCOPES, ComputeServicer
    from contiguouskv.v1 import compute_pb2, compute_pb2_grpc

    device, dtype = _resolve_device(config)
    log.info("loading model %s on %s (%s)", config.model, device, dtype)
    model = load_model(config.model, cache_dir=config.resolved_cache_dir(), dtype=TORCH_DTYPES[dtype], device=device)
    token = read_token_file(config.cache_token_file) if config.cache_token_file is not None else None
    cache = CacheClient(config.cache, config.max_message_bytes, config.rpc_timeout_s,
                        config.replication, config.write_quorum, config.cache_refresh_s,
                        tls=config.cache_tls(), token=token)
    await cache.start()
    core = ComputeCore(config, model, ModelRunner(model), cache)
    interceptors, metrics = telemetry.server_interceptors(), None
    if config.metrics_port is not None:
        from contiguouskv.compute_server.observability.metrics import ComputeMetrics, MetricsInterceptor, start_metrics_server

        observed = ComputeMetrics()
        interceptors.append(MetricsInterceptor(observed))
        metrics = start_metrics_server(config.host, config.metrics_port, observed)
    # Last, so tracing and the request metrics see refused calls with their status.
    access = access_interceptor(METHOD_SCOPES, config.auth_tokens_file, config.max_streams_per_client)
    if access is not None:
        interceptors.append(access)
    server = grpc.aio.server(options=channel_options(config.max_message_bytes), interceptors=interceptors or None)
    compute_pb2_grpc.add_ComputeServiceServicer_to_server(ComputeServicer(core, device), server)
    lifecycle = ServerLifecycle(server, [compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name])
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    try:
        await lifecycle.start(config.host, config.port, config.port_file, f"compute server ({model.name})",
                              credentials, config.health_port)
        await lifecycle.wait_and_drain(config.grace_seconds)
    finally:
        await cache.close()
        core.close()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
    return 0


def run(config: ComputeServerConfig) -> int:
    """Serve until SIGTERM; tracing (service ``contiguouskv-compute``) is set up for the process here."""
    keep_freed_buffers(os.environ)  # reuse the ~1 MiB Fetch response buffers (common/malloc.py)
    with telemetry.tracing("contiguouskv-compute"):
        telemetry.instrument_aio_channels()  # the cache client's channels: RPC spans, W3C context out
        return run_async(serve(config))


def main(argv: list[str] | None = None) -> int:
    from contiguouskv.common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m contiguouskv.compute_server")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    return run(config_from_args(args))
