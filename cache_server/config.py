"""Config of the cache server: one frozen dataclass, validated at construction.

Built once by :func:`contiguouskv.cache_server.server.config_from_args` (flags > env ``CKV_*`` >
JSON file) and passed down through constructors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from contiguouskv.cache_server.eviction import DEFAULT_EVICTION_RULE, EVICTION_RULES
from contiguouskv.cache_server.read_process import ENGINES as READ_ENGINES
from contiguouskv.common.security import check_server_files

MIN_MESSAGE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class CacheServerConfig:
    """Settings of one cache server process.

    ``root`` holds every stored object. ``port`` 0 binds any free port; the bound port is written to
    ``port_file`` when given. ``max_batch_bytes`` caps the payload of one Fetch response;
    ``max_store_bytes`` caps the bytes of all data files (0 = unlimited). ``read_threads`` is the
    size of the disk read pool; ``read_processes`` helper processes (0 = none) make the Fetch reads
    with those threads shared among them (:mod:`.read_process`); ``read_engine`` is how a helper
    reads O_DIRECT files: ``aio`` (Linux native AIO from one thread, ``4 * threads`` reads in
    flight; threads where the kernel refuses it) or ``threads``. ``direct_io`` asks for O_DIRECT
    reads where the filesystem allows.
    ``max_message_bytes`` raises gRPC's send and receive message limits. ``dram_cache_bytes`` is
    the DRAM cache's budget (0 = no cache), kept by the eviction rule ``eviction_rule``
    (``attention``, ``lru``, ``lfu``, ``impress``: :mod:`.eviction`; a config file may still call
    it ``cache_policy``). ``max_inflight_bytes`` bounds the record bytes one Fetch stream holds
    (being read or waiting for the client). ``metrics_port`` serves Prometheus metrics over
    HTTP on ``host`` (``None`` = off, 0 = any free port, logged). ``tls_cert_file`` and
    ``tls_key_file`` serve TLS; ``tls_client_ca_file`` also requires client certificates it signed
    (mutual TLS). ``auth_tokens_file`` requires bearer tokens (see :mod:`contiguouskv.common.security`).
    ``max_streams_per_client`` bounds the calls one client has in flight (0 = unlimited).
    ``health_port`` also serves the health service alone, in plaintext (probes that cannot do TLS).
    ``shm_socket`` (empty: off) is the Unix socket on which co-located compute servers open a
    shared-memory data plane (:mod:`.shm_plane`); its directory is created with mode 0700 and only
    peers of the server's own user are accepted.
    """

    root: Path
    host: str = "127.0.0.1"
    port: int = 0
    port_file: Path | None = None
    max_batch_bytes: int = 1 << 20
    max_store_bytes: int = 0
    read_threads: int = 16
    read_processes: int = 1
    read_engine: str = "aio"
    grace_seconds: float = 5.0
    direct_io: bool = True
    max_message_bytes: int = 64 << 20
    dram_cache_bytes: int = 1 << 30
    eviction_rule: str = DEFAULT_EVICTION_RULE
    max_inflight_bytes: int = 16 << 20
    metrics_port: int | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens_file: Path | None = None
    max_streams_per_client: int = 256
    health_port: int | None = None
    shm_socket: str = ""

    def __post_init__(self) -> None:
        if not str(self.root):
            raise ValueError("root: must name a directory")
        if not self.host:
            raise ValueError("host: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is outside 0..65535")
        if self.max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes: {self.max_batch_bytes} must be at least 1")
        if self.max_store_bytes < 0:
            raise ValueError(f"max_store_bytes: {self.max_store_bytes} must be >= 0 (0 = unlimited)")
        if self.read_threads < 1:
            raise ValueError(f"read_threads: {self.read_threads} must be at least 1")
        if not 0 <= self.read_processes <= self.read_threads:
            raise ValueError(f"read_processes: {self.read_processes} must be between 0 and read_threads")
        if self.read_engine not in READ_ENGINES:
            raise ValueError(f"read_engine: {self.read_engine!r} is not one of {', '.join(READ_ENGINES)}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds: {self.grace_seconds} must be >= 0")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes: {self.max_message_bytes} must be at least {MIN_MESSAGE_BYTES}"
            )
        if self.dram_cache_bytes < 0:
            raise ValueError(f"dram_cache_bytes: {self.dram_cache_bytes} must be >= 0 (0 = off)")
        if self.eviction_rule not in EVICTION_RULES:
            raise ValueError(f"eviction_rule: {self.eviction_rule!r} is not one of {', '.join(EVICTION_RULES)}")
        if self.max_inflight_bytes < self.max_batch_bytes:
            raise ValueError(f"max_inflight_bytes: {self.max_inflight_bytes} must be at least "
                             f"max_batch_bytes ({self.max_batch_bytes})")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is outside 0..65535")
        if self.health_port is not None and not 0 < self.health_port <= 65535:
            raise ValueError(f"health_port: {self.health_port} is outside 1..65535")
        if self.max_streams_per_client < 0:
            raise ValueError(f"max_streams_per_client: {self.max_streams_per_client} must be >= 0 (0 = unlimited)")
        if self.shm_socket and len(self.shm_socket.encode()) > 100:
            raise ValueError(f"shm_socket: {self.shm_socket!r} is longer than a Unix socket path may be (100 bytes)")
        check_server_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, self.auth_tokens_file)
        if self.max_batch_bytes > self.max_message_bytes // 2:
            raise ValueError(
                f"max_batch_bytes: {self.max_batch_bytes} must be at most half of "
                f"max_message_bytes ({self.max_message_bytes})"
            )

    @property
    def max_record_bytes(self) -> int:
        """Largest record size accepted at PutPrefix: one record must fit in one response."""
        return self.max_message_bytes // 2
