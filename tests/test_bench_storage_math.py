"""The storage bench's arithmetic on synthetic runs: medians of side-by-side rounds, ratios, CPU per GB."""

from __future__ import annotations

import pytest

from contiguouskv.bench import storage


def _run(gbps: float, cpu: float, client: float = 0.0, shm: float = 0.0) -> dict:
    return {"gbps": gbps, "records_per_s": gbps * 1e4, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_s_per_gb": cpu,
            "client_cpu_s_per_gb": client, "server_cpu_s_per_gb": cpu - client, "shm_fraction": shm,
            "in_place_fraction": 0.0, "bytes": 1000, "read_amplification": 1.0, "dram_hits": 0, "direct_io": True}


def test_rows_take_the_median_round_and_the_median_of_the_rounds_ratios() -> None:
    ways = ["grpc/1", "shm/1"]
    rounds = {0.5: [
        {"raw": _run(1.0, 1.0), "grpc/1": _run(0.5, 2.0, 0.5), "shm/1": _run(0.9, 1.0, 0.2, 1.0)},
        {"raw": _run(2.0, 1.0), "grpc/1": _run(0.8, 2.0, 0.5), "shm/1": _run(2.2, 0.8, 0.2, 1.0)},
        {"raw": _run(1.0, 1.0), "grpc/1": _run(0.9, 2.0, 0.5), "shm/1": _run(1.0, 0.9, 0.2, 1.0)},
    ]}
    dram = {0.5: {"grpc/1": _run(1.5, 1.0, 0.4), "shm/1": _run(3.0, 0.5, 0.2, 1.0)}}
    for way in ways:
        dram[0.5][way]["dram_hits"] = 7
    report = storage._report({"records": 1}, 0.0, [0.5], ways, rounds, dram)
    rows = {(r["path"], r["source"]): r for r in report["rows"]}
    grpc_disk, shm_disk = rows[("grpc", "disk")], rows[("shm", "disk")]
    assert grpc_disk["gbps"] == 0.8  # the median round: 0.5, 0.8, 0.9
    assert grpc_disk["over_raw_rounds"] == [0.5, 0.4, 0.9] and grpc_disk["over_raw"] == 0.5
    assert shm_disk["gbps"] == 1.0 and shm_disk["over_raw"] == pytest.approx(1.0)  # ratios 0.9, 1.1, 1.0
    assert grpc_disk["raw_gbps"] == shm_disk["raw_gbps"] == 1.0  # raw's own median round
    assert rows[("shm", "dram")]["gbps"] == 3.0 and "raw_gbps" not in rows[("shm", "dram")]
    assert report["direct_io"]
    compare = {(c["source"], c["compare"]): c for c in report["summary"]}
    assert compare[("dram", "shm/grpc")]["gbps_ratio"] == 2.0 and compare[("dram", "shm/grpc")]["cpu_ratio"] == 0.5
    assert compare[("disk", "shm/grpc")]["cpu_ratio"] == pytest.approx(0.9 / 2.0)


def test_stream_ratios_compare_each_count_with_one_stream_on_the_same_path_and_source() -> None:
    rows = [{"selection": 1.0, "path": "grpc", "source": "dram", "streams": n, "gbps": g, "cpu_s_per_gb": c}
            for n, g, c in ((1, 1.0, 1.0), (4, 1.5, 0.8))]
    (only,) = storage._ratios(rows)
    assert only["compare"] == "4/1 streams" and only["gbps_ratio"] == 1.5 and only["cpu_ratio"] == pytest.approx(0.8)


def test_ways_are_every_path_by_every_stream_count_and_bad_lists_are_refused() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    storage.add_arguments(parser)
    assert storage._ways(parser.parse_args(["--path", "grpc,shm", "--streams", "1,4"])) == [
        "grpc/1", "grpc/4", "shm/1", "shm/4"]
    for bad in (["--path", "tcp"], ["--streams", "0"], ["--streams", "x"]):
        with pytest.raises(SystemExit):
            storage._ways(parser.parse_args(bad))
