"""Config loading: one frozen dataclass per process, resolved flags > env (``CKV_*``) > file.

A service declares its config as a frozen dataclass whose fields have defaults and whose
``__post_init__`` validates them. :func:`load_config` builds it once in ``main()``; the instance is
then passed down through constructors. Nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "CKV_"

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing, malformed or out of range; the message names the field."""


def _coerce(name: str, raw: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, raw, inner[0])
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        items = [i.strip() for i in items if not isinstance(i, str) or i.strip()]
        elem = args[0] if args else str
        return tuple(_coerce(name, i, elem) for i in items)
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            # a JSON 1.5 or true is not an integer: int() would make it 1 without a word
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if hint is float and isinstance(raw, bool):
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
        if hint is Path:
            return Path(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {getattr(hint, '__name__', hint)}") from exc
    return raw


def _read_renamed(values: Mapping[str, Any], renamed: Mapping[str, str], where: str) -> Mapping[str, Any]:
    """``values`` with each old key of ``renamed`` read as its new key (the new key wins if both)."""
    old_keys = [old for old in renamed if old in values]
    if not old_keys:
        return values
    out = dict(values)
    for old in old_keys:
        logger.warning("%s %s is deprecated: use %s", where, old, renamed[old])
        out.setdefault(renamed[old], out.pop(old))
    return out


def load_config(
    cls: type[T],
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | Path | None = None,
    renamed: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from flags (highest), then ``CKV_<FIELD>`` env vars, then a JSON file.

    ``flags`` values that are ``None`` count as not given. Unknown keys in the file are an error.
    ``renamed`` maps old field names to current ones: a file key or ``CKV_<OLD>`` env var of an
    old name still sets the field (with a warning) unless the same source also gives the new name.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}  # where each value came from, for the error that names it
    if file is not None:
        try:
            data = json.loads(Path(file).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {file}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file}: expected a JSON object")
        data = _read_renamed(data, renamed or {}, f"config file {file}: key")
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"config file {file}: unknown keys {sorted(unknown)}")
        values.update(data)
        source.update((name, f"config file {file}") for name in data)
    env_values = _read_renamed(os.environ if env is None else env,
                               {ENV_PREFIX + old.upper(): ENV_PREFIX + new.upper()
                                for old, new in (renamed or {}).items()}, "env")
    for name in fields:
        key = ENV_PREFIX + name.upper()
        if key in env_values:
            values[name], source[name] = env_values[key], f"env {key}"
    for name, value in (flags or {}).items():
        if name in fields and value is not None:
            values[name], source[name] = value, f"--{name.replace('_', '-')}"

    def sourced(message: str) -> str:
        """``message`` with where its field's value came from, when it names a field that was set."""
        name = message.split(":", 1)[0]
        return f"{message} (from {source[name]})" if name in source else message

    coerced = {}
    for name, value in values.items():
        try:
            coerced[name] = _coerce(name, value, hints[name])
        except ConfigError as exc:
            raise ConfigError(sourced(str(exc))) from None
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in coerced
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("; ".join(f"{name} is required: give --{name.replace('_', '-')}, "
                                    f"{ENV_PREFIX}{name.upper()} or \"{name}\" in the --config file"
                                    for name in missing))
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(sourced(str(exc))) from exc
