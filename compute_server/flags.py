"""The compute server's command line: flags -> :class:`ComputeServerConfig` (no torch, no model code).

The CLI builds its ``serve compute`` parser from :func:`add_arguments` on machines that only run the
storage node, so this module imports nothing heavy; :mod:`.server` runs the process.
"""

from __future__ import annotations

import argparse

from contiguouskv.common.config import load_config
from contiguouskv.common.serving import SERVING_FIELDS, add_serving_arguments
from contiguouskv.compute_server.config import ComputeServerConfig


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
    parser.add_argument("--kv-dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the prefix KV this server stores (default: the compute dtype); e.g. "
                        "bfloat16 KV under float32 compute on a CPU without fast bfloat16")
    parser.add_argument("--model-cache-dir", help="where converted models are kept (default ~/.cache/contiguouskv)")
    parser.add_argument("--chunk-size", type=int, help="tokens per ContiguousChunk at registration (default 16)")
    parser.add_argument("--policy-plugin", dest="policy_plugins", action="append", metavar="MODULE:CLASS",
                        help="also serve this loading policy (a LoadingPolicy subclass; repeatable) "
                        "(env CKV_POLICY_PLUGINS, comma-separated)")
    parser.add_argument("--max-active-requests", type=int,
                        help="requests computing at once; more wait in the queue (default 32)")
    parser.add_argument("--max-queued-requests", type=int,
                        help="requests waiting for admission; more are refused with RESOURCE_EXHAUSTED (default 256)")
    parser.add_argument("--max-staged-bytes", type=int,
                        help="prefix KV bytes the running requests may stage together, host and device "
                        "(default 8 GiB; a request alone is always admitted)")
    parser.add_argument("--ident-cache-bytes", type=int,
                        help="identification data of hot prefixes kept resident, so their requests read only "
                        "the K/V they select (default 1 GiB; per-prefix LRU; 0 = off)")
    parser.add_argument("--max-batch", type=int,
                        help="requests whose next layer shares one batched pass (default 16; 1 = no batching)")
    parser.add_argument("--data-path", choices=("auto", "grpc", "shm"),
                        help="records from the cache: shared memory of a co-located cache server when "
                             "--shm-socket reaches one (auto), gRPC bytes only (grpc), or shared memory required (shm)")
    parser.add_argument("--shm-socket", help="the co-located cache server's --shm-socket (off if absent)")
    parser.add_argument("--shm-slots", type=int, help="slots of the shared buffer (32)")
    parser.add_argument("--shm-slot-bytes", type=int, help="bytes per slot = largest batch on the plane, a multiple of 4096 (4 MiB)")
    parser.add_argument("--fetch-streams", type=int,
                        help="Fetch streams per request, its reads spread over them and the prefix's replicas (1)")
    parser.add_argument("--score-dtype", choices=("auto", "float32", "bfloat16"),
                        help="dtype of the chunk scorers' q.k matmuls (default float32; auto: bfloat16 on cuda and "
                        "on CPUs with AVX512-BF16 or AMX; softmax and sums stay float32)")
    parser.add_argument("--score-heads", choices=("sum", "max"),
                        help="how contiguous+, contiguous+1bit, contiguous+quest and oracle combine the query heads' "
                        "mass on a chunk: summed (default, the paper's) or the largest head's (docs/selection.md)")
    parser.add_argument("--score-window", type=int,
                        help="contiguous+, contiguous+1bit, contiguous+quest and oracle score chunks with the query's "
                        "last this many tokens; 0 = every token (default 8; docs/selection.md)")
    parser.add_argument("--look-ahead-threads", type=int,
                        help="threads running policies' look-ahead (contiguous+ scores layer l+1 while layer l "
                        "runs) off the requests' threads; 0 = on the request's thread (default 1)")
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
             ("model", "cache", "replication", "write_quorum", "host", "port", "port_file", "device", "dtype", "kv_dtype",
              "model_cache_dir", "chunk_size", "metrics_port", "threads", "score_dtype", "score_heads", "score_window",
              "look_ahead_threads", "policy_plugins", "max_active_requests",
              "max_queued_requests", "max_staged_bytes", "max_batch", "ident_cache_bytes", "data_path", "shm_socket",
              "shm_slots", "shm_slot_bytes", "fetch_streams", *SERVING_FIELDS,
              "cache_tls_ca_file", "cache_tls_cert_file", "cache_tls_key_file", "cache_tls_server_name",
              "cache_token_file")}
    return load_config(ComputeServerConfig, flags, file=getattr(args, "config", None))
