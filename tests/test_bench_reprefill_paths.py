"""``contiguouskv bench --path grpc,shm`` and ``--score-window 0,3``: the cold rows on one compute server
per variant, side by side, on real servers; several prefix lengths; the defaults; warm rows."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path


def _side_by_side(tmp_path: Path, *variants: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """`full` and `contiguous+` at 10 % of a 512-token tiny prefix, cold, one request each, with
    ``variants`` (``--path grpc,shm`` or ``--score-window 0,3``); the run and its JSON rows."""
    out = tmp_path / "side.json"
    proc = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "--model", "random:tiny",
                           "--prefix-tokens", "512", "--query-tokens", "8", "--budgets", "0.1",
                           "--policies", "full,contiguous+", "--repeats", "1", "--warm-prefixes", "0",
                           "--dtype", "float32", "--device", "cpu", *variants,
                           "--json", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(out.read_text())["results"]


def test_bench_measures_each_policy_over_grpc_and_shared_memory(tmp_path: Path) -> None:
    _, rows = _side_by_side(tmp_path, "--path", "grpc,shm")
    assert sorted((r["policy"], r["path"]) for r in rows) == [
        ("contiguous+", "grpc"), ("contiguous+", "shm"), ("full", "grpc"), ("full", "shm")]
    by = {(r["policy"], r["path"]): r for r in rows}
    for policy in ("full", "contiguous+"):
        grpc_row, shm_row = by[(policy, "grpc")], by[(policy, "shm")]
        assert grpc_row["bytes_shm"] == 0 and shm_row["bytes_shm"] > 0  # the shm rows really used the plane
        assert shm_row["speedup_over_grpc"] == grpc_row["ttft_ms_p50"] / shm_row["ttft_ms_p50"]
        assert "speedup_over_grpc" not in grpc_row
        # speedups compare rows of one path only
        assert set(shm_row["speedup"]) == set(grpc_row["speedup"]) == (set() if policy == "full" else {"full"})
    assert by[("full", "grpc")]["bytes_fetched"] == by[("full", "shm")]["bytes_fetched"] > 0


def test_bench_measures_each_scoring_window_side_by_side(tmp_path: Path) -> None:
    proc, rows = _side_by_side(tmp_path, "--score-window", "0,3")
    # the windows the two servers reported, each cell on both
    assert sorted((r["policy"], r["score_window"]) for r in rows) == [
        ("contiguous+", 0), ("contiguous+", 3), ("full", 0), ("full", 3)]
    by = {(r["policy"], r["score_window"]): r for r in rows}
    plus0, plus3 = by[("contiguous+", 0)], by[("contiguous+", 3)]
    assert plus3["speedup_vs_score_window"] == {"0": plus0["ttft_ms_p50"] / plus3["ttft_ms_p50"]}
    assert plus3["speedup"] == {"full": by[("full", 3)]["ttft_ms_p50"] / plus3["ttft_ms_p50"]}  # one window's rows
    assert "w0" in proc.stdout and "w3" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "--model", "random:tiny",
                          "--score-window", "8,-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--score-window" in bad.stderr


def test_bench_runs_several_prefix_lengths_in_one_run_and_plots_the_scaling(tmp_path: Path) -> None:
    out, plots = tmp_path / "lengths.json", tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "--model", "random:tiny",
                           "--prefix-tokens", "512,1536", "--query-tokens", "8", "--budgets", "0.25",
                           "--policies", "full,contiguous", "--repeats", "1", "--warm-prefixes", "0",
                           "--dtype", "float32", "--device", "cpu", "--json", str(out), "--plot", str(plots),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["policy"], r["prefix_tokens"]) for r in rows) == [
        ("contiguous", 512), ("contiguous", 1536), ("full", 512), ("full", 1536)]
    by = {(r["policy"], r["prefix_tokens"]): r for r in rows}
    for policy in ("full", "contiguous"):  # more prefix, more bytes, for both
        assert by[(policy, 1536)]["bytes_from_disk"] > by[(policy, 512)]["bytes_from_disk"] > 0
    for r in rows:  # every row carries the true floor
        assert r["floor_ms"] == max(r["io_floor_ms"], r["resident_compute_ms"]) and r["resident_compute_ms"] > 0
        assert r["ttft_over_floor"] == r["ttft_ms_p50"] / r["floor_ms"]
    assert {p.name for p in plots.iterdir()} == {"timeline.png", "ttft_vs_budget.png", "scaling.png"}


def test_bench_defaults_run_every_loading_policy_cold_at_five_percent(tmp_path: Path) -> None:
    """No policy, budget, repeat or warm option given: the quick defaults (recompute left for --full)."""
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "--model", "random:tiny",
                           "--prefix-tokens", "1024", "--query-tokens", "4", "--device", "cpu",
                           "--json", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert doc["config"]["dtype"] == "auto" and doc["config"]["kv_dtype"] == "bfloat16"
    assert doc["machine"]["dtype"] == "bfloat16"  # the stored KV's dtype
    policies = {r["policy"] for r in rows}
    assert "recompute" not in policies and {"full", "contiguous", "contiguous+", "h2o", "impress"} <= policies
    assert {r["cache"] for r in rows} == {"cold"}
    assert {r["budget"] for r in rows if r["selective"]} == {0.05}
    assert "left in this phase" in proc.stderr  # the estimate, from the second cell on
    assert doc["wall_s"] > doc["registration_s"] > 0


def test_warm_rows_run_each_baseline_with_its_own_rule_and_a_budget_below_its_hot_set(tmp_path: Path) -> None:
    out = tmp_path / "warm.json"
    proc = subprocess.run([sys.executable, "-m", "contiguouskv", "bench", "--model", "random:tiny",
                           "--prefix-tokens", "1024", "--query-tokens", "4", "--budgets", "0.25",
                           "--policies", "full,contiguous", "--repeats", "1", "--warm-prefixes", "2",
                           "--warm-queries", "2", "--device", "cpu", "--json", str(out), "--path", "grpc,shm",
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warm = [r for r in json.loads(out.read_text())["results"] if r["cache"] == "warm"]
    # every warm cell over both data paths, side by side: the shared-memory one reads the DRAM
    # cache's hits in place, and is compared with the same cell over gRPC bytes
    assert sorted((r["policy"], r["eviction_rule"], r["path"]) for r in warm) == sorted(
        (p, rule, path) for p, rule in [("contiguous", "attention"), ("full", "attention"), ("full", "lru")]
        for path in ("grpc", "shm"))
    for row in warm:
        assert (row["bytes_shm"] > 0) == (row["path"] == "shm") and row["bytes_from_dram"] > 0
        assert ("speedup_over_grpc" in row) == (row["path"] == "shm")
    rows = [r for r in warm if r["path"] == "grpc"]
    # half the hot set: all of full's K/V, a quarter of it for contiguous at 25 %, over the distinct prefixes
    kv = 2 * 4 * 2 * 16 * 1024 * 2  # K+V x layers x kv_heads x head_dim x tokens x bf16 (random:tiny)
    by = {(r["policy"], r["eviction_rule"]): r for r in rows}
    full_budget = by[("full", "lru")]["dram_budget_bytes"]
    assert full_budget == by[("full", "attention")]["dram_budget_bytes"] and full_budget in (kv // 2, kv)
    distinct = full_budget // (kv // 2)
    assert by[("contiguous", "attention")]["dram_budget_bytes"] == int(0.5 * 0.25 * kv * distinct)
    ours = by[("contiguous", "attention")]
    assert set(ours["speedup"]) == {"full"} and set(ours["speedup_vs_own_rule"]) == {"full"}
    assert ours["speedup_vs_own_rule"]["full"] == by[("full", "lru")]["ttft_ms_p50"] / ours["ttft_ms_p50"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_sigterm_to_the_bench_stops_the_servers_it_started(tmp_path: Path) -> None:
    bench = subprocess.Popen([sys.executable, "-m", "contiguouskv", "bench", "--model", "random:tiny",
                              "--prefix-tokens", "1024", "--query-tokens", "4", "--device", "cpu", "--repeats", "50",
                              "--workdir", str(tmp_path / "work")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert bench.stderr is not None
        for line in bench.stderr:  # once measuring, both servers run
            if "cold 1/" in line:
                break
        servers = _children(bench.pid)
        assert len(servers) == 2, servers  # the cache server and the compute server
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        assert not [p for p in servers if Path(f"/proc/{p}").exists() and "Z" not in
                    Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]], "servers left running"
    finally:
        bench.kill()
        bench.wait()
