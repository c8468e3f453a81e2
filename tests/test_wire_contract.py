"""The proto files are the source of truth: lint-clean, and the committed stubs match a fresh run."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "proto" / "contiguouskv" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    # The script runs `python` and protoc's mypy plugins from PATH: this interpreter's first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True,
                   capture_output=True, cwd=ROOT, env={**os.environ, "PATH": path})
    fresh = tmp_path / "contiguouskv" / "v1"
    generated = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert len(generated) == 8
    _, mismatch, missing = filecmp.cmpfiles(STUBS, fresh, generated, shallow=False)
    assert not mismatch and not missing, f"stale stubs {mismatch + missing}: run scripts/gen_protos.sh"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert buf, "buf (pip package buf-bin, in the dev extra) is not installed"
    result = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

