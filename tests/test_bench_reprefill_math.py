"""The Re-Prefill bench's arithmetic on synthetic rows: floors, ratios, breakdown, percentiles, speedups."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from contiguouskv.bench import reprefill
from contiguouskv.bench.reprefill import Row, _p95, _speedups, source_commit
from contiguouskv.client import ModelInfo

GBPS = {"64KiB": 0.5, "128KiB": 1.0, "1MiB": 2.0}


def _row(policy: str = "contiguous", **values: object) -> Row:
    row = Row(policy, "contiguous", True, 0.05, "cold", 16384, 64)
    for name, value in values.items():
        setattr(row, name, value)
    return row


def test_the_floor_is_the_larger_of_the_disk_time_and_the_resident_compute() -> None:
    # three runs: per run 100 MB from disk, 10 MB of it identification data (read at the 1 MiB rate)
    row = _row(ttft_ms=[300.0, 500.0, 400.0], io_wait_ms=[50.0, 70.0, 60.0], compute_ms=[250.0, 420.0, 330.0],
               ident_wait_ms=[5.0, 15.0, 10.0], resident_ms=[80.0, 120.0, 100.0], overhead_ms=[200.0, 300.0, 250.0],
               bytes_from_disk=200_000_000 * 3 // 2, bytes_identification=30_000_000)
    s = row.summary(GBPS, "128KiB")
    io_floor = (100e6 - 10e6) / 1e9 * 1e3 + 10e6 / 2e9 * 1e3  # 90 ms at 1 GB/s + 5 ms at 2 GB/s
    assert s["io_floor_ms"] == pytest.approx(io_floor)
    assert s["resident_compute_ms"] == 100.0 and s["floor_ms"] == pytest.approx(100.0)  # compute-bound
    assert s["floor_sum_ms"] == pytest.approx(io_floor + 100.0)
    assert s["ttft_ms_p50"] == 400.0 and s["ttft_over_floor"] == pytest.approx(4.0)
    assert s["overlap_floor_ms"] == 330.0 and s["ttft_over_overlap_floor"] == pytest.approx(400 / 330)
    assert s["breakdown_ms"] == {"record_wait": 50.0, "ident_wait": 10.0, "resident_compute": 100.0,
                                 "overhead": 250.0}
    disk_bound = _row(ttft_ms=[400.0], io_wait_ms=[0.0], compute_ms=[10.0], resident_ms=[10.0],
                      bytes_from_disk=300_000_000).summary(GBPS, "128KiB")
    assert disk_bound["floor_ms"] == pytest.approx(300.0) and disk_bound["ttft_over_floor"] == pytest.approx(4 / 3)


def test_p95_picks_the_value_at_the_95th_percentile_rank() -> None:
    assert _p95([5.0]) == 5.0
    assert _p95([float(v) for v in range(1, 101)]) == 95.0
    assert _p95([3.0, 1.0, 2.0]) == 3.0


def _result(policy: str, ttft: float, path: str = "grpc", selective: bool = True, budget: float = 0.05,
            page_cache_reads: int = 0, score_window: int = 8) -> dict[str, object]:
    return {"policy": policy, "ttft_ms_p50": ttft, "path": path, "selective": selective, "budget": budget,
            "cache": "cold", "prefix_tokens": 16384, "page_cache_reads": page_cache_reads,
            "score_window": score_window}


def test_speedups_compare_one_path_and_budget_and_leave_page_cache_rows_out() -> None:
    rows = [_result("full", 1000.0, selective=False, budget=1.0), _result("contiguous", 250.0),
            _result("contiguous+", 200.0), _result("impress", 800.0, page_cache_reads=3),
            _result("contiguous", 125.0, path="shm"), _result("contiguous", 100.0, budget=0.1)]
    _speedups(rows)
    contiguous = rows[1]["speedup"]
    assert contiguous == {"full": 4.0, "contiguous+": 0.8}  # not impress (page cache), not shm, not budget 0.1
    assert rows[3]["speedup"] == {}  # a page-cache row compares with nothing
    assert rows[4]["speedup_over_grpc"] == 2.0 and "speedup_over_grpc" not in rows[1]


def test_speedups_compare_one_window_and_each_cell_across_windows() -> None:
    rows = [_result("full", 1000.0, selective=False, budget=1.0), _result("contiguous+", 400.0),
            _result("full", 1100.0, selective=False, budget=1.0, score_window=0),
            _result("contiguous+", 800.0, score_window=0), _result("contiguous+", 200.0, path="shm")]
    _speedups(rows)
    assert rows[1]["speedup"] == {"full": 2.5} and rows[3]["speedup"] == {"full": 1.375}
    assert rows[1]["speedup_vs_score_window"] == {"0": 2.0}  # the same cell with every query token
    assert rows[3]["speedup_vs_score_window"] == {"8": 0.5}
    assert "speedup_vs_score_window" not in rows[4]  # shm: no other window on that path
    assert rows[4]["speedup_over_grpc"] == 2.0


def test_rows_of_two_start_orders_merge_into_one_row_per_cell_and_path() -> None:
    from contiguouskv.bench.reprefill import _merged

    first = [_row(ttft_ms=[1.0], io_wait_ms=[0.1], bytes_from_disk=10, path="grpc"),
             _row(ttft_ms=[2.0], io_wait_ms=[0.2], bytes_from_disk=20, path="shm")]
    second = [_row(ttft_ms=[3.0], io_wait_ms=[0.3], bytes_from_disk=30, path="shm", recall=0.5),
              _row(ttft_ms=[4.0], io_wait_ms=[0.4], bytes_from_disk=40, path="grpc")]
    merged = {r.path: r for r in _merged(first, second)}
    assert len(merged) == 2
    assert merged["grpc"].ttft_ms == [1.0, 4.0] and merged["grpc"].bytes_from_disk == 50
    assert merged["shm"].ttft_ms == [2.0, 3.0] and merged["shm"].bytes_from_disk == 50 and merged["shm"].recall == 0.5
    # per run, bytes are the mean over both orders' runs
    assert merged["shm"].summary(GBPS, "128KiB")["bytes_from_disk"] == 25


def test_defaults_are_quick_unless_full_and_never_override_what_was_given() -> None:
    parser = argparse.ArgumentParser()
    reprefill.add_arguments(parser)
    quick = parser.parse_args([])
    reprefill.apply_defaults(quick)
    assert (quick.budgets, quick.repeats, quick.warm_prefixes, quick.policies) == ("0.05", 2, 0, reprefill.LOADING)
    assert (quick.dtype, quick.kv_dtype) == ("auto", "bfloat16")
    full = parser.parse_args(["--full"])
    reprefill.apply_defaults(full)
    assert (full.budgets, full.repeats, full.warm_prefixes, full.policies) == ("0.05,0.1,0.25,0.5", 3, 3, "all")
    gpu = parser.parse_args(["--gpu-suite"])
    reprefill.apply_defaults(gpu)
    assert (gpu.budgets, gpu.repeats, gpu.warm_prefixes, gpu.policies) == ("0.05,0.1,0.25,0.5", 3, 3, "all")
    given = parser.parse_args(["--full", "--repeats", "1", "--budgets", "0.2", "--warm-prefixes", "0",
                               "--policies", "full"])
    reprefill.apply_defaults(given)
    assert (given.budgets, given.repeats, given.warm_prefixes, given.policies) == ("0.2", 1, 0, "full")


def test_eta_extrapolates_the_mean_cell_time() -> None:
    assert reprefill.eta(30.0, 0, 4) == ""  # nothing measured yet
    assert reprefill.eta(30.0, 1, 4) == " (about 1m30s left in this phase)"
    assert reprefill.eta(10.0, 2, 4) == " (about 10s left in this phase)"
    assert reprefill.eta(10.0, 4, 4) == ""


def test_warm_budget_is_a_fraction_of_the_policys_hot_set() -> None:
    info = ModelInfo(name="random:kvheavy", fingerprint="", num_layers=28, num_kv_heads=4, head_dim=128,
                     num_attention_heads=4, hidden_size=512, vocab_size=32000, max_position_embeddings=131072,
                     has_tokenizer=False, dtype="bfloat16", device="cpu", chunk_size=16, policies=())
    per_prefix = reprefill.kv_bytes(info, 16384)
    assert per_prefix == 896 * 2**20  # 16K tokens of random:kvheavy in bf16
    assert reprefill.dram_budget(per_prefix, 3, 1.0, 0.5) == int(1.5 * per_prefix)  # full: half of 3 prefixes
    assert reprefill.dram_budget(per_prefix, 3, 0.05, 0.5) == int(0.075 * per_prefix)  # 5 %: half of its 5 %


def test_warm_speedups_compare_like_rules_and_each_baseline_with_its_own() -> None:
    def warm(policy: str, ttft: float, rule: str, selective: bool = True) -> dict[str, object]:
        row = _result(policy, ttft, selective=selective, budget=0.05 if selective else 1.0)
        row.update(cache="warm", eviction_rule=rule)
        return row

    rows = [warm("full", 900.0, "attention", False), warm("full", 1200.0, "lru", False),
            warm("impress", 1000.0, "attention"), warm("impress", 800.0, "impress"),
            warm("contiguous", 200.0, "attention")]
    _speedups(rows)
    ours = rows[4]
    assert ours["speedup"] == {"full": 4.5, "impress": 5.0}  # everyone on the attention-guided cache
    assert ours["speedup_vs_own_rule"] == {"full": 6.0, "impress": 4.0}  # full on LRU, impress on its own score
    assert rows[1]["speedup"] == {}  # nobody else ran on LRU


def test_the_json_names_the_commit_it_measured() -> None:
    commit = source_commit()  # the suite runs from a git checkout (CI: a fresh clone)
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit), commit


def test_reports_record_paths_without_the_machine_s_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contiguouskv.bench.reprefill import _shown

    monkeypatch.chdir(tmp_path)
    assert _shown(tmp_path / "docs" / "bench" / "run.json") == "docs/bench/run.json"
    assert _shown(Path("docs/bench/run.json")) == "docs/bench/run.json"
    assert _shown(Path("/elsewhere/on/this/machine/run.json")) == "run.json"
