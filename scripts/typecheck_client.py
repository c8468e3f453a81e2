#!/usr/bin/env python3
"""``mypy --strict -p contiguouskv.client``, the SDK's typing gate (tests/test_sdk.py runs it).

mypy cannot follow the editable install's import hook, which maps top-level folders to
``contiguouskv.*`` (see pyproject.toml), so this builds the same package tree from symlinks under
``.mypy_cache/shadow`` and points ``MYPYPATH`` at it. Extra arguments go to mypy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# contiguouskv.X -> folder, as in [tool.setuptools.package-dir]
LINKS = {"common": ROOT / "contiguouskv" / "common", "client": ROOT / "client",
         "v1": ROOT / "proto" / "contiguouskv" / "v1", "__init__.py": ROOT / "contiguouskv" / "__init__.py"}


def shadow_tree() -> Path:
    base = ROOT / ".mypy_cache" / "shadow"
    package = base / "contiguouskv"
    package.mkdir(parents=True, exist_ok=True)
    for name, target in LINKS.items():
        link = package / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return base


def main() -> int:
    env = {**os.environ, "MYPYPATH": str(shadow_tree())}
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(ROOT / ".mypy_cache"),
               "-p", "contiguouskv.client", *sys.argv[1:]]
    return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main())
