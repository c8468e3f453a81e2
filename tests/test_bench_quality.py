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
    assert data["per_prefix"] == 5 and data["prefixes"] == 1  # the two questions share one registered prefix
    rows = {(r["policy"], r["budget"]): r for r in data["results"]}
    assert set(rows) == {("full", 1.0), ("oracle", 0.25), ("contiguous+", 0.25)}
    for r in rows.values():
        for key in ("policy", "budget", "prefix_tokens", "n", "accuracy", "answers_kept", "top1_agreement", "kl",
                    "oracle_recall", "bytes_read_pct", "bytes_read_warm_pct", "ident_wait_ms"):
            assert key in r, key
        assert r["n"] == 2 and 250 < r["prefix_tokens"] < 400
        assert r["total_ms"] >= r["ttft_ms"] > 0  # the whole request includes its first token
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


def test_overall_rows_weight_lengths_by_cases() -> None:
    from contiguouskv.bench.quality import AVERAGED, overall

    def row(length: int, n: int, kept: float | None, kept_of: int, acc: float, pct: float) -> dict[str, object]:
        r: dict[str, object] = {key: 0.0 for key in AVERAGED}
        r.update(policy="p", budget=0.05, length=length, n=n, answers_kept=kept, kept_of=kept_of, accuracy=acc,
                 bytes_read_pct=pct, prefix_tokens=length, oracle_recall=None)
        return r

    older = row(4096, 10, 0.5, 10, 0.3, 14.0)
    del older["total_ms"]  # a row of a run from before the key existed, as --merge may meet
    got = overall([row(2048, 30, 0.9, 20, 0.6, 10.0), older, row(0, 99, 0.0, 1, 0, 0)])
    assert len(got) == 1
    (r,) = got
    assert r["length"] == 0 and r["n"] == 40 and r["kept_of"] == 30
    assert r["answers_kept"] == round((18 + 5) / 30, 4)  # kept cases, not a mean of the two fractions
    assert r["accuracy"] == round((0.6 * 30 + 0.3 * 10) / 40, 4) and r["bytes_read_pct"] == 11.0
    assert r["oracle_recall"] is None and r["prefix_tokens"] == 2560
