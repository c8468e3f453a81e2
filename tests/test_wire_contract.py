"""The proto files are the source of truth: lint-clean, and the committed stubs match a fresh run."""

from __future__ import annotations

import filecmp
import json
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


def _imports(code: str) -> list[str]:
    """Modules of torch, transformers and the compute server that ``code`` ends up importing."""
    probe = code + (
        "\nimport sys, json\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        " or m.startswith('contiguouskv.compute_server'))))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_storage_node_and_sdk_never_import_torch_or_compute_code() -> None:
    assert _imports("import contiguouskv.cache_server.server, contiguouskv.cache_server.service\n"
                    "import contiguouskv.client") == []


def test_cli_builds_its_parser_without_torch() -> None:
    loaded = _imports("import contiguouskv.cli\n"
                      "contiguouskv.cli.build_parser().parse_args(['serve', 'cache', '--root', 'x'])")
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")], loaded
