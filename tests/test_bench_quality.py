"""`contiguouskv bench quality` end to end on the real SmolLM2 (small: 2 cases of ~300 tokens)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quality_bench_rows(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    run = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "quality", "--model", "smollm2-135m-instruct",
                          "--lengths", "300", "--cases", "2", "--budgets", "0.25", "--policies", "oracle,contiguous+",
                          "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[quality 2/2]" in run.stderr and "contiguous+" in run.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["cases"] == 2 and data["kv_dtype"] == "bfloat16"
    rows = {(r["policy"], r["budget"]): r for r in data["results"]}
    assert set(rows) == {("full", 1.0), ("oracle", 0.25), ("contiguous+", 0.25)}
    for r in rows.values():
        for key in ("policy", "budget", "prefix_tokens", "n", "accuracy", "answers_kept", "top1_agreement", "kl",
                    "oracle_recall", "bytes_read_pct", "bytes_read_warm_pct", "ident_wait_ms"):
            assert key in r, key
        assert r["n"] == 2 and 250 < r["prefix_tokens"] < 400
    full, oracle, plus = rows[("full", 1.0)], rows[("oracle", 0.25)], rows[("contiguous+", 0.25)]
    assert full["bytes_read_pct"] == 100.0 and full["top1_agreement"] == 1.0 and full["kl"] == 0.0
    assert full["answers_kept"] in (None, 1.0)
    # the oracle is the exact top-k the evaluation scores against: recall 1 by construction
    assert oracle["oracle_recall"] == 1.0 and oracle["oracle_mass_recall"] == 1.0
    assert 0.0 < plus["oracle_recall"] <= 1.0
    # the oracle reads every key (50 % of K+V) besides its K/V; contiguous+ reads 2-bit keys
    assert oracle["bytes_read_pct"] - oracle["bytes_read_warm_pct"] > 45
    assert 5 < plus["bytes_read_pct"] - plus["bytes_read_warm_pct"] < 12
    assert plus["bytes_read_warm_pct"] >= 25 * 0.9
