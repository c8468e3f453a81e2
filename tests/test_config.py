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
])
def test_bad_values_name_the_field(flags: dict[str, object], field: str) -> None:
    base = {"model": "random:tiny", "cache": "h:1"}
    with pytest.raises(ConfigError, match=field):
        load_config(ComputeServerConfig, {**base, **flags}, env={})


def test_unknown_file_keys_are_rejected(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"model": "m", "cache": ["h:1"], "chunksize": 8}))
    with pytest.raises(ConfigError, match="chunksize"):
        load_config(ComputeServerConfig, {}, env={}, file=file)
