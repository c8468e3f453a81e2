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


def test_operations_doc_names_the_limits_without_a_flag() -> None:
    """docs/operations.md's Limits table names config fields; those without a flag must be in its
    "no flag" list (set by env or file), and that list must name only real fields without a flag."""
    import argparse
    import dataclasses
    import re

    from contiguouskv.cache_server import server as cache_server
    from contiguouskv.cache_server.config import CacheServerConfig
    from contiguouskv.compute_server.flags import add_arguments

    no_flag: set[str] = set()
    fields: set[str] = set()
    for config, add in ((ComputeServerConfig, add_arguments), (CacheServerConfig, cache_server.add_arguments)):
        parser = argparse.ArgumentParser()
        add(parser)
        dests = {action.dest for action in parser._actions}
        names = {f.name for f in dataclasses.fields(config)}
        fields |= names
        no_flag |= names - dests
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    sentence = re.search(r"These have no flag; set them by env or file:(.*?)\. An", text, re.S)
    assert sentence, "the no-flag sentence of docs/operations.md moved"
    listed = set(re.findall(r"`(\w+)`", sentence.group(1)))
    table = text.split("| Limit (field) |", 1)[1].split("\n\n", 1)[0]
    named = {name for row in table.splitlines()[2:] for name in re.findall(r"^\| `(\w+)`", row)}
    assert named <= fields, f"table rows that are not config fields: {sorted(named - fields)}"
    assert listed <= no_flag, f"listed but they have a flag (or are not fields): {sorted(listed - no_flag)}"
    assert named & no_flag <= listed, f"limits without a flag not listed: {sorted(named & no_flag - listed)}"


def test_a_refused_value_names_where_it_came_from(tmp_path: Path) -> None:
    base = {"model": "random:tiny", "cache": "a:1"}
    with pytest.raises(ConfigError, match=r"score_heads: .*got 'mean' \(from env CKV_SCORE_HEADS\)"):
        load_config(ComputeServerConfig, base, env={"CKV_SCORE_HEADS": "mean"})
    with pytest.raises(ConfigError, match=r"score_window: must be >= 0 .*got -8 \(from env CKV_SCORE_WINDOW\)"):
        load_config(ComputeServerConfig, base, env={"CKV_SCORE_WINDOW": "-8"})
    assert load_config(ComputeServerConfig, base, env={"CKV_SCORE_WINDOW": "8"}).score_window == 8
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"score_heads": "MAX"}))
    with pytest.raises(ConfigError, match=rf"got 'MAX' \(from config file {file}\)"):
        load_config(ComputeServerConfig, base, env={}, file=file)
    with pytest.raises(ConfigError, match=r"port: .* \(from --port\)"):
        load_config(ComputeServerConfig, {**base, "port": "x"}, env={})
