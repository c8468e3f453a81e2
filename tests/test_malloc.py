"""glibc malloc tuning for ~1 MiB messages: applied by default, never over an operator's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contiguouskv.common import malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_applied_in_a_fresh_process_and_skipped_when_the_operator_set_it() -> None:
    code = "import os; from contiguouskv.common.malloc import keep_freed_buffers as k; print(k(os.environ))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin"})
    assert fresh.stdout.strip() == "True"
    assert malloc.keep_freed_buffers({"MALLOC_TRIM_THRESHOLD_": "1048576"}) is False
    assert malloc.keep_freed_buffers({"MALLOC_MMAP_THRESHOLD_": "1048576"}) is False
