"""Object keys and the one function that maps a key to its files.

An object is addressed by ``(prefix_id, layout)``. Its files live at
``root/objects/<prefix_id>/<layout>.data`` and ``<layout>.manifest``; files being written carry a
``.tmp-`` name in the same directory (so a rename commits them), which no key can produce because
prefix ids and layouts start with a letter or digit.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from pathlib import Path

from contiguouskv.cache_server.errors import InvalidArgument

PREFIX_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
LAYOUT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
REGION_RE = re.compile(r"[A-Za-z0-9_./-]{1,128}")

OBJECTS_DIR = "objects"
DATA_SUFFIX = ".data"
MANIFEST_SUFFIX = ".manifest"
TEMP_PREFIX = ".tmp-"
SHOWN_CHARS = 80  # of a rejected name in an error message (a status message must stay small)


def shown(value: object) -> str:
    """``repr`` of a caller's value for an error message, cut to about ``SHOWN_CHARS`` characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def check_prefix_id(prefix_id: str) -> str:
    """Return ``prefix_id`` if it matches ``PREFIX_ID_RE``; else raise ``InvalidArgument``."""
    if not isinstance(prefix_id, str) or not PREFIX_ID_RE.fullmatch(prefix_id):
        raise InvalidArgument(f"prefix_id {shown(prefix_id)} must match {PREFIX_ID_RE.pattern}")
    return prefix_id


def check_layout(layout: str) -> str:
    """Return ``layout`` if it matches ``LAYOUT_RE`` and holds no ``..``; else ``InvalidArgument``."""
    if not isinstance(layout, str) or not LAYOUT_RE.fullmatch(layout) or ".." in layout:
        raise InvalidArgument(f"layout {shown(layout)} must match {LAYOUT_RE.pattern} without '..'")
    return layout


def check_region_name(name: str) -> str:
    """Return a region name (a name inside a data file, never a path) or raise ``InvalidArgument``."""
    if not isinstance(name, str) or not REGION_RE.fullmatch(name):
        raise InvalidArgument(f"region {shown(name)} must match {REGION_RE.pattern}")
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectKey:
    """Address of one stored object; constructing it validates both parts (``InvalidArgument``)."""

    prefix_id: str
    layout: str

    def __post_init__(self) -> None:
        check_prefix_id(self.prefix_id)
        check_layout(self.layout)

    def __str__(self) -> str:
        return f"{self.prefix_id}/{self.layout}"


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectPaths:
    """Files of one object: its directory, committed data and manifest, and temp-file names."""

    directory: Path
    data: Path
    manifest: Path

    def temp_for(self, final: Path) -> Path:
        """A fresh temp name in the same directory for a file that will be renamed to ``final``."""
        return self.directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}-{final.name}"


def object_paths(root: Path, key: ObjectKey) -> ObjectPaths:
    """The one mapping of a key to its files under ``root`` (the key was validated on creation)."""
    directory = Path(root) / OBJECTS_DIR / key.prefix_id
    return ObjectPaths(
        directory=directory,
        data=directory / f"{key.layout}{DATA_SUFFIX}",
        manifest=directory / f"{key.layout}{MANIFEST_SUFFIX}",
    )
