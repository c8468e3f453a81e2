"""Compute server configuration: one frozen dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contiguouskv.common.security import ClientTls, check_server_files, is_loopback
from contiguouskv.common.discovery import check_entry, is_dns

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16", "auto")
DATA_PATHS = ("auto", "grpc", "shm")
SCORE_DTYPES = ("auto", "float32", "bfloat16")
SCORE_HEADS = ("sum", "max")
SCORE_WINDOW = 8
"""Default ``score_window``: on the quality suite the query's last 8 tokens kept 17 and 27 of 28
answers at 5 % and 10 % where every token kept 14 and 26 (docs/selection.md)."""


def default_cache_dir() -> Path:
    """``~/.cache/contiguouskv``: where converted models live unless ``model_cache_dir`` says otherwise."""
    return Path.home() / ".cache" / "contiguouskv"


@dataclass(frozen=True)
class ComputeServerConfig:
    """Everything one compute server process needs; built once in ``main()``."""

    model: str
    cache: tuple[str, ...]
    # Shards per prefix (0: 2 where >= 2 shards, else 1) and how many must commit a registration
    # (0: a majority of the replicas). See docs/deploy.md, "Sharding and replication".
    replication: int = 0
    write_quorum: int = 0
    cache_refresh_s: float = 30.0
    host: str = "127.0.0.1"
    port: int = 0
    port_file: Path | None = None
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (None = off, 0 = any free port)
    device: str = "auto"
    dtype: str = "auto"
    kv_dtype: str | None = None  # stored prefix KV; None = the compute dtype
    model_cache_dir: Path | None = None
    chunk_size: int = 16
    group_size: int = 8
    default_period: int = 8
    default_sub_period: int = 4  # a policy may declare its own default period (contiguous+: 1)
    # Extra loading policies, each "module.path:ClassName" of a LoadingPolicy subclass (docs/architecture.md).
    policy_plugins: tuple[str, ...] = ()
    importance_window: int = 32
    threads: int = 0
    # dtype of the chunk scorers' q.k matmuls: float32, bfloat16, or auto (bfloat16 where the device
    # has native bfloat16 dot products). float32 by default: bfloat16 kept one answer fewer of 28 at
    # 10 % on the real model (docs/selection.md, "Scoring precision").
    score_dtype: str = "float32"
    # How the per-layer chunk scorers (contiguous+, contiguous+1bit, contiguous+quest, oracle) combine
    # the query heads' attention mass on a chunk: summed (the paper's rule) or the largest head's.
    # max kept 17 of 28 answers at 5 % against 14, and 24 against 26 at 10 % (docs/selection.md,
    # "Combining heads"): opt-in.
    score_heads: str = "sum"
    # The query's last this many tokens score chunks in those same policies (0: every query token).
    # SnapKV's observation window; docs/selection.md, "Scoring with the query's last tokens".
    score_window: int = SCORE_WINDOW
    # Threads that run policies' look-ahead (contiguous+ scoring layer l + 1 while layer l runs) off
    # the requests' threads; 0 = on the request's own thread (docs/performance.md, "contiguous+'s speculation
    # on a look-ahead thread").
    look_ahead_threads: int = 1
    prefill_block: int = 1024
    max_prefix_tokens: int = 32768
    max_query_tokens: int = 4096
    max_new_tokens: int = 512
    # Serving engine (docs/operations.md): requests running at once, the KV they may stage together
    # (host and device), the queue behind them, and requests per batched layer pass (1 = no batching).
    max_active_requests: int = 32
    max_queued_requests: int = 256
    max_staged_bytes: int = 8 << 30
    max_batch: int = 16
    # Identification data (quantised keys, digests) of hot prefixes kept resident; 0 = off.
    ident_cache_bytes: int = 1 << 30
    fetch_batch_bytes: int = 1 << 20
    # Data path from the cache (docs/operations.md, "Data path"): "auto" uses the shared-memory plane
    # of a co-located cache server when ``shm_socket`` reaches one and gRPC bytes otherwise; "grpc"
    # never uses it; "shm" requires it. ``shm_slots`` x ``shm_slot_bytes`` is the shared buffer.
    data_path: str = "auto"
    shm_socket: str = ""
    shm_slots: int = 32
    shm_slot_bytes: int = 4 << 20
    # Fetch streams per request, its reads spread over them (and over the prefix's replicas).
    fetch_streams: int = 1
    rpc_timeout_s: float = 600.0
    grace_seconds: float = 5.0
    max_message_bytes: int = 64 << 20
    # Serving side: TLS (mutual with a client CA), bearer tokens, calls in flight per client.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens_file: Path | None = None
    max_streams_per_client: int = 64
    health_port: int | None = None  # health service alone, plaintext (probes that cannot do TLS)
    # Client side, to the cache servers: TLS when a CA bundle is given (mutual with cert + key),
    # the name their certificates carry when it is not the address's host, and a bearer token.
    cache_tls_ca_file: Path | None = None
    cache_tls_cert_file: Path | None = None
    cache_tls_key_file: Path | None = None
    cache_tls_server_name: str = ""
    cache_token_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: required (a preset like random:tiny, a real model name or a folder)")
        if not self.cache:
            raise ValueError("cache: at least one cache server address HOST:PORT is required")
        for address in self.cache:
            try:
                check_entry(address)
            except ValueError:
                raise ValueError(f"cache: {address!r} is not HOST:PORT or dns:///NAME:PORT") from None
        twice = sorted({a for a in self.cache if self.cache.count(a) > 1})
        if twice:
            raise ValueError(f"cache: {twice[0]} is listed twice; list each shard once (replicas are placed "
                             "on distinct shards)")
        remote = [a for a in self.cache if not is_loopback(a.removeprefix("dns:///"))]
        if self.cache_token_file is not None and self.cache_tls_ca_file is None and remote:
            raise ValueError(f"cache_token_file: a bearer token is sent only over TLS (or to a loopback address); "
                             f"give cache_tls_ca_file to reach {remote[0]}")
        if self.replication < 0 or self.write_quorum < 0:
            raise ValueError("replication/write_quorum: must be >= 0 (0 = default)")
        if not any(is_dns(a) for a in self.cache) and self.replication > len(set(self.cache)):
            raise ValueError(f"replication: {self.replication} exceeds the {len(set(self.cache))} cache shard(s) listed")
        if self.replication and self.write_quorum > self.replication:
            raise ValueError(f"write_quorum: {self.write_quorum} exceeds replication {self.replication}")
        if not self.cache_refresh_s > 0:
            raise ValueError(f"cache_refresh_s: must be > 0, got {self.cache_refresh_s}")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {DEVICES}, got {self.device!r}")
        if self.kv_dtype is not None and self.kv_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"kv_dtype: must be float32, bfloat16 or float16, got {self.kv_dtype!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be in [0, 65535], got {self.metrics_port}")
        for name in ("chunk_size", "group_size", "default_period", "default_sub_period",
                     "importance_window",
                     "prefill_block", "max_prefix_tokens", "max_query_tokens", "fetch_batch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.default_sub_period > self.default_period:
            raise ValueError("default_sub_period: must not exceed default_period")
        if not 0 <= self.look_ahead_threads <= 64:
            raise ValueError(f"look_ahead_threads: must be in [0, 64], got {self.look_ahead_threads}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype: must be one of {SCORE_DTYPES}, got {self.score_dtype!r}")
        if self.score_heads not in SCORE_HEADS:
            raise ValueError(f"score_heads: must be one of {SCORE_HEADS}, got {self.score_heads!r}")
        if self.score_window < 0:
            raise ValueError(f"score_window: must be >= 0 (0 = every query token), got {self.score_window}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0 (0 = torch's default), got {self.threads}")
        for name in ("max_active_requests", "max_staged_bytes", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.data_path not in DATA_PATHS:
            raise ValueError(f"data_path: must be one of {DATA_PATHS}, got {self.data_path!r}")
        if self.data_path == "shm" and not self.shm_socket:
            raise ValueError("data_path: shm needs shm_socket (the co-located cache server's socket)")
        if self.shm_slots < 2 or self.shm_slot_bytes < 4096 or self.shm_slot_bytes % 4096:
            raise ValueError(f"shm_slots/shm_slot_bytes: need >= 2 slots of a positive multiple of 4096 bytes, "
                             f"got {self.shm_slots} x {self.shm_slot_bytes}")
        if not 1 <= self.fetch_streams <= 64:
            raise ValueError(f"fetch_streams: must be in [1, 64], got {self.fetch_streams}")
        if self.ident_cache_bytes < 0:
            raise ValueError(f"ident_cache_bytes: must be >= 0 (0 = off), got {self.ident_cache_bytes}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests: must be >= 0, got {self.max_queued_requests}")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens: must be >= 0")
        if self.health_port is not None and not 0 < self.health_port <= 65535:
            raise ValueError(f"health_port: must be in [1, 65535], got {self.health_port}")
        if self.max_streams_per_client < 0:
            raise ValueError(f"max_streams_per_client: must be >= 0 (0 = unlimited), got {self.max_streams_per_client}")
        check_server_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, self.auth_tokens_file)
        if (self.cache_tls_cert_file is None) != (self.cache_tls_key_file is None):
            raise ValueError("cache_tls_cert_file and cache_tls_key_file: give both or neither")
        if self.cache_tls_cert_file is not None and self.cache_tls_ca_file is None:
            raise ValueError("cache_tls_cert_file: mutual TLS to the cache needs cache_tls_ca_file too")
        for name in ("cache_tls_ca_file", "cache_tls_cert_file", "cache_tls_key_file", "cache_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")

    def cache_tls(self) -> ClientTls | None:
        """How to reach the cache servers over TLS (``None``: plaintext)."""
        if self.cache_tls_ca_file is None:
            return None
        return ClientTls(self.cache_tls_ca_file, self.cache_tls_cert_file, self.cache_tls_key_file,
                         self.cache_tls_server_name or None)

    def resolved_cache_dir(self) -> Path:
        return self.model_cache_dir or default_cache_dir()
