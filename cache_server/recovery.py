"""Start-up scan of the store's root: remove what a crash left, load what was committed.

A committed object is a manifest plus a data file of the size it names. Temp files (``.tmp-*``)
and data files without a manifest are leftovers of writes that never committed and are removed.
A manifest that cannot be read, or whose data file is missing or of the wrong size, is logged and
left in place (an operator may want it) but never served.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from contiguouskv.cache_server.errors import InvalidArgument
from contiguouskv.cache_server.keys import (
    DATA_SUFFIX,
    MANIFEST_SUFFIX,
    TEMP_PREFIX,
    ObjectKey,
    object_paths,
)
from contiguouskv.cache_server.manifest import Manifest

logger = logging.getLogger(__name__)


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(root: Path, objects_dir: Path) -> dict[ObjectKey, Manifest]:
    """Clean leftovers under ``objects_dir`` and return the manifests of committed objects."""
    found: dict[ObjectKey, Manifest] = {}
    removed = 0
    for prefix_dir in sorted(objects_dir.iterdir()):
        if not prefix_dir.is_dir():
            logger.warning("ignoring %s: not a prefix directory", prefix_dir)
            continue
        dir_removed = _remove_leftovers(prefix_dir)
        for manifest_path in sorted(prefix_dir.glob(f"*{MANIFEST_SUFFIX}")):
            manifest = _load(root, prefix_dir.name, manifest_path)
            if manifest is not None:
                found[manifest.key] = manifest
        if dir_removed:
            fsync_dir(prefix_dir)
        removed += dir_removed
        if not any(prefix_dir.iterdir()):
            prefix_dir.rmdir()
    logger.info("store at %s: %d objects, %d leftover files removed", root, len(found), removed)
    return found


def _remove_leftovers(prefix_dir: Path) -> int:
    removed = 0
    for path in sorted(prefix_dir.iterdir()):
        name = path.name
        is_temp = name.startswith(TEMP_PREFIX)
        is_orphan = (
            name.endswith(DATA_SUFFIX)
            and not path.with_name(name[: -len(DATA_SUFFIX)] + MANIFEST_SUFFIX).exists()
        )
        if (is_temp or is_orphan) and path.is_file():
            logger.info("removing leftover %s", path)
            path.unlink()
            removed += 1
    return removed


def _load(root: Path, prefix_id: str, manifest_path: Path) -> Manifest | None:
    layout = manifest_path.name[: -len(MANIFEST_SUFFIX)]
    try:
        key = ObjectKey(prefix_id, layout)
        manifest = Manifest.from_json(manifest_path.read_bytes())
        if manifest.key != key:
            raise ValueError(f"manifest names {manifest.key}, its path says {key}")
        data_path = object_paths(root, key).data
        actual = data_path.stat().st_size if data_path.exists() else None
        if actual != manifest.data_bytes:
            raise ValueError(f"data file {data_path} has {actual} bytes, not {manifest.data_bytes}")
    except (OSError, ValueError, InvalidArgument) as exc:
        logger.error("not serving %s: %s", manifest_path, exc)
        return None
    return manifest
