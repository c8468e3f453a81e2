"""The `contiguouskv` command as scripts use it: --json output, exit codes, error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv import launch


def ckv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contiguouskv", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def compute_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        with launch.compute_server("random:tiny", cache.address, "--dtype", "float32") as compute:
            yield compute.address


def test_register_and_query_print_json(compute_address: str) -> None:
    reg = ckv("register", "--server", compute_address, "--token-ids", "5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21",
              "--json")
    assert reg.returncode == 0, reg.stderr
    registered = json.loads(reg.stdout)
    assert registered["num_tokens"] == 17 and len(registered["prefix_id"]) == 32
    out = ckv("query", "--server", compute_address, "--prefix", registered["prefix_id"], "--token-ids", "3,4",
              "--policy", "full", "--max-new-tokens", "2", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    for key in ("token_id", "text", "policy", "budget", "ttft_ms", "bytes_fetched"):
        assert key in answer
    assert answer["policy"] == "full" and answer["bytes_fetched"] > 0 and answer["ttft_ms"] > 0
    assert len(answer["generated_ids"]) == 2
    again = ckv("query", "--server", compute_address, "--prefix", registered["prefix_id"], "--token-ids", "3,4",
                "--policy", "recompute", "--json")
    assert json.loads(again.stdout)["token_id"] == answer["token_id"]


def test_errors_exit_nonzero_with_status_name(compute_address: str, tmp_path: Path) -> None:
    missing = ckv("query", "--server", compute_address, "--prefix", "f" * 32, "--token-ids", "1")
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr
    bad = ckv("query", "--server", compute_address, "--prefix", "f" * 32, "--token-ids", "1", "--budget", "2")
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "budget" in bad.stderr
    down = ckv("query", "--server", "127.0.0.1:1", "--prefix", "f" * 32, "--token-ids", "1", "--timeout", "5")
    assert down.returncode != 0 and "UNAVAILABLE" in down.stderr and "127.0.0.1:1" in down.stderr
    assert "contiguouskv serve compute" in down.stderr


def test_a_missing_compute_extra_is_named_with_the_install_command() -> None:
    # safetensors stands for any package of the compute extra that an install left out
    code = ("import sys; sys.modules['safetensors'] = None\n"
            "from contiguouskv.cli import main\n"
            "sys.exit(main(['serve', 'compute', '--model', 'random:tiny', '--cache', '127.0.0.1:1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "safetensors" in done.stderr and "pip install 'contiguouskv[compute]'" in done.stderr
    assert "Traceback" not in done.stderr
