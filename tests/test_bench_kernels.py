"""`contiguouskv bench kernels`: runs end to end on tiny shapes; its summary is the ratio of its rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from contiguouskv.bench.kernels import summarize


def test_summary_divides_fresh_by_reused_per_kernel_length_and_rows() -> None:
    rows = [
        {"kernel": "a", "memory": "fresh", "prefix_tokens": 8, "rows": 4, "ms_p50": 9.0},
        {"kernel": "a", "memory": "reused", "prefix_tokens": 8, "rows": 4, "ms_p50": 3.0},
        {"kernel": "a", "memory": "fresh", "prefix_tokens": 8, "rows": 2, "ms_p50": 1.0},
        {"kernel": "a", "memory": "reused", "prefix_tokens": 8, "rows": 2, "ms_p50": 4.0},
        {"kernel": "a", "memory": "reused", "dtype": "bfloat16", "prefix_tokens": 8, "rows": 4, "ms_p50": 1.5},
        {"kernel": "b", "memory": "fresh", "prefix_tokens": 16, "rows": 0, "ms_p50": 5.0},  # no reused row: left out
        {"kernel": "b", "memory": "reused", "dtype": "bfloat16", "prefix_tokens": 16, "rows": 0, "ms_p50": 1.0},
        {"kernel": "c", "memory": "decoded", "dtype": "float32", "prefix_tokens": 16, "rows": 8, "ms_p50": 6.0},
        {"kernel": "c", "memory": "tiled", "dtype": "float32", "prefix_tokens": 16, "rows": 8, "ms_p50": 2.0},
    ]
    assert summarize(rows) == [
        {"kernel": "a", "prefix_tokens": 8, "rows": 2, "fresh_over_reused": 0.25},
        {"kernel": "a", "prefix_tokens": 8, "rows": 4, "fresh_over_reused": 3.0},
        {"kernel": "a", "prefix_tokens": 8, "rows": 4, "float32_over_bfloat16": 2.0},  # reused float32 / bfloat16
        {"kernel": "c", "prefix_tokens": 16, "rows": 8, "decoded_over_tiled": 3.0},
    ]


def test_bench_kernels_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    done = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "kernels", "--model", "random:tiny",
                           "--prefix-tokens", "200,333", "--query-tokens", "20", "--repeats", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    rows = doc["results"]
    # every kernel at every length, both ways; the scores with the query's 20 rows, the speculation's
    # 16 and the default score window's 8
    cells = {(r["kernel"], r["prefix_tokens"], r["rows"], r["memory"]) for r in rows}
    for n in (200, 333):
        for kernel, t in (("qkeys_decode", 0), ("exact_scores", 20), ("exact_scores", 16), ("exact_scores", 8),
                          ("gather", 0), ("join_kv", 20)):
            assert {(kernel, n, t, "fresh"), (kernel, n, t, "reused")} <= cells
        for t in (20, 16, 8):  # the packed record to scores, decoded whole and tiled
            assert {("qkeys_scores", n, t, "decoded"), ("qkeys_scores", n, t, "tiled")} <= cells
    # the scoring kernels in bfloat16 too, into reused buffers
    low = {(r["kernel"], r["prefix_tokens"], r["rows"]) for r in rows if r["dtype"] == "bfloat16"}
    assert low == {(k, n, t) for n in (200, 333) for k, t in (("qkeys_decode", 0), ("exact_scores", 20),
                                                            ("exact_scores", 16), ("exact_scores", 8))}
    assert all(r["memory"] == "reused" for r in rows if r["dtype"] == "bfloat16")
    assert all(r["ms_p50"] >= r["ms_min"] > 0 and r["repeats"] == 2 for r in rows)
    assert doc["summary"] == summarize(rows) and len(doc["summary"]) == 26
    assert "fresh/reused" in done.stdout and "float32/bfloat16" in done.stdout and "decoded/tiled" in done.stdout


def test_bench_kernels_wants_a_preset() -> None:
    done = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "kernels", "--model", "qwen2.5-coder-0.5b"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "random:PRESET" in done.stderr
