"""Cache server config: validation, and flags > env ``CKV_*`` > JSON file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.server import add_arguments, config_from_args
from contiguouskv.common.config import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        CacheServerConfig(root=tmp_path, port=70000)
    with pytest.raises(ValueError, match="read_threads"):
        CacheServerConfig(root=tmp_path, read_threads=0)
    with pytest.raises(ValueError, match="max_batch_bytes"):
        CacheServerConfig(root=tmp_path, max_batch_bytes=0)
    with pytest.raises(ValueError, match="max_store_bytes"):
        CacheServerConfig(root=tmp_path, max_store_bytes=-1)
    with pytest.raises(ValueError, match="eviction_rule.*attention, lru, lfu, impress"):
        CacheServerConfig(root=tmp_path, eviction_rule="fifo")
    with pytest.raises(ValueError, match="dram_cache_bytes"):
        CacheServerConfig(root=tmp_path, dram_cache_bytes=-1)
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        CacheServerConfig(root=tmp_path, max_inflight_bytes=1000)
    with pytest.raises(ValueError, match="metrics_port"):
        CacheServerConfig(root=tmp_path, metrics_port=-1)
    config = config_from_args(parse("--root", str(tmp_path), "--eviction-rule", "lfu",
                                    "--dram-cache-bytes", "0", "--metrics-port", "0"))
    assert (config.eviction_rule, config.dram_cache_bytes, config.metrics_port) == ("lfu", 0, 0)


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "cache.json"
    file.write_text(json.dumps({"root": str(tmp_path / "from-file"), "port": 7000,
                                "max_batch_bytes": 4096, "read_threads": 3}))
    monkeypatch.setenv("CKV_PORT", "7001")
    monkeypatch.setenv("CKV_MAX_BATCH_BYTES", "8192")
    config = config_from_args(parse("--config", str(file), "--port", "7002"))
    assert config == CacheServerConfig(root=tmp_path / "from-file", port=7002,
                                       max_batch_bytes=8192, read_threads=3)


def test_eviction_rule_is_still_read_under_its_old_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKV_EVICTION_RULE", raising=False)
    monkeypatch.delenv("CKV_CACHE_POLICY", raising=False)
    assert config_from_args(parse("--root", str(tmp_path), "--cache-policy", "lru")).eviction_rule == "lru"
    assert "--eviction-rule" in _help() and "deprecated name of --eviction-rule" in _help()
    file = tmp_path / "cache.json"
    file.write_text(json.dumps({"root": str(tmp_path), "cache_policy": "lfu"}))
    assert config_from_args(parse("--config", str(file))).eviction_rule == "lfu"
    file.write_text(json.dumps({"root": str(tmp_path), "cache_policy": "lfu", "eviction_rule": "impress"}))
    assert config_from_args(parse("--config", str(file))).eviction_rule == "impress"  # the new key wins
    monkeypatch.setenv("CKV_CACHE_POLICY", "lru")
    assert config_from_args(parse("--config", str(file))).eviction_rule == "lru"  # env beats file
    monkeypatch.setenv("CKV_EVICTION_RULE", "attention")
    assert config_from_args(parse("--config", str(file))).eviction_rule == "attention"
    assert config_from_args(parse("--config", str(file), "--cache-policy", "lfu")).eviction_rule == "lfu"
    file.write_text(json.dumps({"root": str(tmp_path), "cache_polcy": "lfu"}))
    with pytest.raises(ConfigError, match="cache_polcy"):
        config_from_args(parse("--config", str(file)))


def _help() -> str:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.format_help()


def test_missing_root_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKV_ROOT", raising=False)
    with pytest.raises(ConfigError, match="root"):
        config_from_args(parse("--port", "0"))
    with pytest.raises(ConfigError, match="port"):
        config_from_args(parse("--root", "/tmp/x", "--port", "-1"))


def test_log_flags_do_not_override_a_parent_parser() -> None:
    parent = argparse.ArgumentParser()
    parent.add_argument("--log-level", default="INFO")
    add_arguments(parent.add_subparsers(dest="cmd").add_parser("cache"))
    assert parent.parse_args(["--log-level", "DEBUG", "cache"]).log_level == "DEBUG"
    assert parent.parse_args(["cache", "--log-level", "WARNING"]).log_level == "WARNING"
