"""Compute server configuration: one frozen dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_cache_dir() -> Path:
    """``~/.cache/contiguouskv``: where converted models live unless ``model_cache_dir`` says otherwise."""
    return Path.home() / ".cache" / "contiguouskv"


@dataclass(frozen=True)
class ComputeServerConfig:
    """Everything one compute server process needs; built once in ``main()``."""

    model: str
    cache: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 0
    port_file: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    model_cache_dir: Path | None = None
    chunk_size: int = 16
    group_size: int = 8
    default_period: int = 8
    default_sub_period: int = 4
    # contiguous+ scores every layer (one layer ahead): per-layer selection keeps the answer where
    # the paper's 8-layer periods lose it (see docs/benchmarks.md).
    plus_default_period: int = 1
    importance_window: int = 32
    prefill_block: int = 1024
    max_prefix_tokens: int = 32768
    max_query_tokens: int = 4096
    max_new_tokens: int = 512
    fetch_batch_bytes: int = 1 << 20
    rpc_timeout_s: float = 600.0
    grace_seconds: float = 5.0
    max_message_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: required (a preset like random:tiny, a real model name or a folder)")
        if not self.cache:
            raise ValueError("cache: at least one cache server address HOST:PORT is required")
        for address in self.cache:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"cache: {address!r} is not HOST:PORT")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        for name in ("chunk_size", "group_size", "default_period", "default_sub_period", "plus_default_period",
                     "importance_window",
                     "prefill_block", "max_prefix_tokens", "max_query_tokens", "fetch_batch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.default_sub_period > self.default_period:
            raise ValueError("default_sub_period: must not exceed default_period")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens: must be >= 0")

    def resolved_cache_dir(self) -> Path:
        return self.model_cache_dir or default_cache_dir()
