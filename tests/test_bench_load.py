"""``contiguouskv bench load``: the real thing briefly (own servers, levels and a soak), and its parts."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from contiguouskv import cli
from contiguouskv.bench import load
from contiguouskv.client import NotFoundError

LEVEL_KEYS = {"concurrency", "rps", "ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99", "errors", "errors_total",
              "rss_growth_pct", "requests"}


def _bench(tmp_path: Path, *flags: str) -> Any:
    out = tmp_path / "load.json"
    code = cli.main(["bench", "load", "--prefixes", "2", "--prefix-tokens", "256", "--workdir", str(tmp_path),
                     "--json", str(out), *flags])
    report = json.loads(out.read_text())
    assert code == 0, report
    return report


def _check_level(level: Any, concurrency: int) -> None:
    assert LEVEL_KEYS <= level.keys()
    assert level["concurrency"] == concurrency
    assert level["errors"] == {} and level["errors_total"] == 0
    assert level["rps"] > 0 and level["requests"] > 0
    assert 0 < level["ttft_ms_p50"] <= level["ttft_ms_p95"] <= level["ttft_ms_p99"]


def test_levels_on_own_servers_batched_and_not(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--concurrency", "2,4", "--seconds", "3", "--max-batch", "1,8",
                    "--policy", "contiguous,full", "--budget", "0.25,0.5")
    levels = report["results"]
    assert [(r["max_batch"], r["concurrency"]) for r in levels] == [(1, 2), (1, 4), (8, 2), (8, 4)]
    for level in levels:
        _check_level(level, level["concurrency"])
        assert level["rss_growth_pct"] is None and level["peak_rss_mb"]["compute"] > 50
        assert level["policy"] == "contiguous,full" and level["budget"] == "0.25,0.5"
        assert 0 < level["compute_busy_fraction"] < 1.5  # from the compute server's own counters
    # unbatched, every pass served one request; batched with 4 clients, some passes served several
    assert [level["ops_per_pass"] for level in levels[:2]] == [1.0, 1.0]
    assert levels[3]["ops_per_pass"] > 1.0
    ratios = report["rps_over_unbatched"]
    assert set(ratios) == {"8@2", "8@4"}
    assert ratios["8@4"] == levels[3]["rps"] / levels[1]["rps"]
    assert report["config"]["model"] == "random:tiny"
    assert not list(tmp_path.glob("ckv-bench-*"))  # the temp store is gone


def test_compute_thread_use_over_a_level() -> None:
    before = {"busy_s": 1.0, "ops": 10, "batched": 2, "alone": 3}
    after = {"busy_s": 4.0, "ops": 40, "batched": 12, "alone": 8}
    assert load._thread_use(before, after, 6.0) == {"compute_busy_fraction": 0.5, "ops_per_pass": 2.0}
    assert load._thread_use(None, after, 6.0) == {"compute_busy_fraction": None, "ops_per_pass": None}
    assert load._thread_use(before, before, 6.0)["ops_per_pass"] is None  # no pass in the level


def test_soak_samples_both_servers(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--soak", "0.12", "--soak-concurrency", "3", "--sample-every", "1")
    (level,) = report["results"]
    _check_level(level, 3)
    assert level["seconds"] >= 7
    growth = level["rss_growth_pct"]
    assert set(growth) == {"cache", "compute"}
    for proc in level["processes"]:
        assert proc["samples"] >= 5 and len(proc["rss_bytes"]) == proc["samples"]
        assert all(r > 0 for r in proc["rss_bytes"]) and all(f > 0 for f in proc["fd_counts"])
        assert proc["rss_growth_pct"] == growth[proc["name"]]
        assert proc["t_s"][0] < proc["warmup_s"] <= proc["t_s"][-1]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert load._percentile(values, 0.5) == 50.0
    assert load._percentile(values, 0.95) == 95.0
    assert load._percentile(values, 0.99) == 99.0
    assert load._percentile([7.0], 0.99) == 7.0
    assert load._percentile([], 0.5) is None


def test_process_samples_of_this_process() -> None:
    samples = load.ProcessSamples("me", os.getpid())
    for t in (0.0, 1.0, 2.0):
        samples.sample(t)
    summary = samples.summary(warmup_s=0.5)
    assert summary["samples"] == 3 and summary["fds_warm"] > 0
    assert summary["rss_mb_warm"] == samples.rss_bytes[1] / 2**20
    gone = load.ProcessSamples("gone", 2**22 + 1)  # above the kernel's pid_max: no such process
    gone.sample(0.0)
    assert gone.summary(0.0)["rss_growth_pct"] is None


class _FailingClient:
    """Fails the first call with NOT_FOUND, then hangs on every later one."""

    def __init__(self) -> None:
        self.calls = 0

    async def reprefill(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        if self.calls == 1:
            raise NotFoundError("prefix p0 is not registered")
        await asyncio.sleep(3600)


def test_worker_counts_errors_and_bounds_every_call() -> None:
    args = argparse.Namespace(seed=0, query_tokens=4, policy="full", budget=None, timeout=0.05, token_file=None,
                              tls_ca_file=None, tls_cert_file=None, tls_key_file=None, tls_server_name=None)
    gen = load.LoadGenerator(args, "127.0.0.1:1")
    gen.prefixes, gen.vocab = ["p0"], 100
    tally = load.Tally()
    client = _FailingClient()
    asyncio.run(gen._worker(0, client, time.monotonic() + 0.5, tally))  # type: ignore[arg-type]
    assert tally.errors["NOT_FOUND"] == 1
    assert tally.errors["TimeoutError"] == client.calls - 1 >= 1  # hung calls cut by the backstop
    assert tally.ttft_ms == []
