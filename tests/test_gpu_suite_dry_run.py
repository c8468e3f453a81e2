"""``contiguouskv bench --gpu-suite --device cpu``: the GPU suite's code path, end to end, on the smallest
shapes (random:tiny, 512- and 1024-token prefixes, float32, one cold run per cell, no warm stream),
so the suite keeps running between the runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from contiguouskv.bench.reprefill import GPU_SUITE_DRY_RUN
from contiguouskv.compute_server.policies.registry import PolicyRegistry


def test_gpu_suite_dry_run_measures_every_policy(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "--gpu-suite", "--device", "cpu",
                           "--json", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["model"] == "random:tiny"
    assert report["config"]["gpu_suite"] is True and report["config"]["dtype"] == "float32"
    served = PolicyRegistry.with_plugins().classes()  # what a compute server without plugins serves
    rows = report["results"]
    for _, tokens in GPU_SUITE_DRY_RUN:
        run = [r for r in rows if r["prefix_tokens"] == tokens]
        assert {r["policy"] for r in run} == {cls.name for cls in served}, tokens
        for cls in served:
            mine = [r for r in run if r["policy"] == cls.name]
            assert len(mine) == (2 if cls.selective else 1), (tokens, cls.name)  # budgets 0.1 and 0.5
            for r in mine:
                assert r["cache"] == "cold" and r["query_tokens"] == 8
                assert 0 < r["ttft_ms_p50"] < 60_000 and r["ttft_ms_p95"] >= r["ttft_ms_p50"], r
                assert r["bytes_fetched"] > 0 and r["bytes_from_disk"] > 0, r
                if cls.loads_kv:
                    assert r["bytes_kv"] > 0 and r["compute_ms"] > 0, r
    assert report["raw_disk_gbps"] > 0
