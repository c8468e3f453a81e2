"""Config resolution: flags > env CKV_* > file, validated with messages that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contiguouskv.common.config import ConfigError, load_config
from contiguouskv.compute_server.config import ComputeServerConfig


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"model": "random:tiny", "cache": ["a:1"], "port": 7, "chunk_size": 32}))
    env = {"CKV_PORT": "8", "CKV_CACHE": "b:2,c:3"}
    config = load_config(ComputeServerConfig, {"port": 9, "model": None}, env=env, file=file)
    assert config.port == 9 and config.cache == ("b:2", "c:3")
    assert config.model == "random:tiny" and config.chunk_size == 32
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("flags,field", [
    ({"cache": "nohostport"}, "cache"),
    ({"device": "tpu"}, "device"),
    ({"port": "many"}, "port"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"model": ""}, "model"),
    ({"cache": "h:1,h:2,h:1"}, "cache: h:1 is listed twice"),
    ({"cache_token_file": "token"}, "cache_token_file: a bearer token is sent only over TLS"),
    ({"max_staged_bytes": 1.5}, "max_staged_bytes: cannot read 1.5 as int"),
    ({"threads": True}, "threads: cannot read True as int"),
    ({"cache_refresh_s": True}, "cache_refresh_s: cannot read True as float"),
])
def test_bad_values_name_the_field(flags: dict[str, object], field: str) -> None:
    base = {"model": "random:tiny", "cache": "h:1"}  # not loopback: a token to it needs TLS
    with pytest.raises(ConfigError, match=field):
        load_config(ComputeServerConfig, {**base, **flags}, env={})


def test_a_file_that_is_not_json_is_named(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text("{model: 'm'}")
    with pytest.raises(ConfigError, match=f"config file {file}: not valid JSON"):
        load_config(ComputeServerConfig, {}, env={}, file=file)


def test_unknown_file_keys_are_rejected(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"model": "m", "cache": ["h:1"], "chunksize": 8}))
    with pytest.raises(ConfigError, match="chunksize"):
        load_config(ComputeServerConfig, {}, env={}, file=file)
