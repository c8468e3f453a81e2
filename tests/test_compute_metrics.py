"""The compute server's Prometheus endpoint: names by the conventions, TTFT and per-phase histograms
that agree with the replies, request counts by status."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from contiguouskv import launch
from contiguouskv.client import ContiguousKVClient, NotFoundError
from contiguouskv.compute_server.config import ComputeServerConfig


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(compute address, metrics URL) of a compute server started with --metrics-port 0."""
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        with launch.compute_server("random:tiny", cache.address, "--dtype", "float32",
                                   "--metrics-port", "0") as compute:
            found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", compute.log_tail(200))
            assert found, compute.log_tail()
            yield compute.address, found.group(1)


def scrape(url: str) -> dict[str, float]:
    """Every sample as ``name{label=value,...}`` -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_ttft_phases_bytes_and_status_counts(servers: tuple[str, str]) -> None:
    address, url = servers
    with ContiguousKVClient(address, timeout=60) as client:
        reg = client.register(token_ids=list(range(3, 120)))
        full = client.reprefill(reg.prefix_id, [5, 6], policy="full", max_new_tokens=2)
        part = client.reprefill(reg.prefix_id, [5, 6], policy="contiguous", budget=0.5)
        with pytest.raises(NotFoundError):
            client.reprefill("0" * 32, [5])
        streamed = list(client.generate(reg.prefix_id, [5, 6], max_new_tokens=1))
    m = scrape(url)
    assert m["ckv_compute_ttft_seconds_count{policy=full}"] == 2  # Reprefill and Generate
    assert m["ckv_compute_ttft_seconds_count{policy=contiguous}"] == 1
    assert m["ckv_compute_ttft_seconds_sum{policy=contiguous}"] == pytest.approx(part.timings.ttft_ms / 1e3)
    for phase, ms in (("io_wait", part.timings.fetch_wait_ms), ("compute", part.timings.compute_ms),
                      ("fetch", part.timings.fetch_ms)):
        assert m[f"ckv_compute_reprefill_phase_seconds_sum{{phase={phase},policy=contiguous}}"] == \
            pytest.approx(ms / 1e3)
    assert m["ckv_compute_reprefill_phase_seconds_count{phase=decode,policy=full}"] == 2
    assert m["ckv_compute_layer_io_wait_seconds_count{policy=contiguous}"] == len(part.timings.layers)
    assert m["ckv_compute_fetched_bytes_total{policy=contiguous}"] == part.bytes_fetched
    assert m["ckv_compute_fetched_bytes_total{policy=full}"] == 2 * full.bytes_fetched
    assert m["ckv_compute_generated_tokens_total{}"] == (1 + len(full.generated_ids)) + 1 + len(streamed)
    assert m["ckv_compute_requests_total{code=OK,method=Reprefill}"] == 2
    assert m["ckv_compute_requests_total{code=NOT_FOUND,method=Reprefill}"] == 1
    assert m["ckv_compute_requests_total{code=OK,method=Generate}"] == 1
    assert m["ckv_compute_request_duration_seconds_count{method=Reprefill}"] == 3
    assert m["ckv_compute_inflight_requests{method=Reprefill}"] == 0
    assert m["ckv_compute_registrations_total{outcome=stored}"] == 1
    assert m["ckv_compute_stored_bytes_total{}"] == reg.bytes_stored > 0
    assert m["ckv_compute_register_phase_seconds_count{phase=prefill}"] == 1
    # identification data the contiguous call read is resident now; one lookup per period, all misses
    assert m["ckv_compute_ident_cache_bytes{}"] == part.bytes_identification > 0
    assert m["ckv_compute_ident_cache_lookups{result=miss}"] == len(part.periods)
    assert m["ckv_compute_ident_cache_lookups{result=hit}"] == 0
    # admission: nothing running or queued once the calls are answered
    assert m["ckv_compute_admission_requests{state=running}"] == 0
    assert m["ckv_compute_admission_requests{state=queued}"] == 0
    assert m["ckv_compute_admission_staged_bytes{}"] == 0
    # the compute thread: one call at a time, so every pass served one request; busy a while
    passes = m["ckv_compute_thread_passes_total{batched=false}"]
    assert m["ckv_compute_thread_passes_total{batched=true}"] == 0
    assert passes == m["ckv_compute_thread_ops_total{}"] > 4 * 4  # 4 layers x 2 ops x the calls, and more
    assert 0 < m["ckv_compute_thread_busy_seconds_total{}"] < m[
        "ckv_compute_request_duration_seconds_sum{method=Reprefill}"] + m[
        "ckv_compute_request_duration_seconds_sum{method=Generate}"] + m[
        "ckv_compute_request_duration_seconds_sum{method=RegisterPrefix}"]  # it runs within the calls


def test_names_follow_the_prometheus_conventions(servers: tuple[str, str]) -> None:
    text = urllib.request.urlopen(servers[1], timeout=10).read().decode()
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("ckv_")]
    assert len(families) >= 10
    for family in families:
        assert re.fullmatch(r"ckv_compute_[a-z_]+", family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|mib)(_|$)", family.name), family.name
        assert family.documentation, family.name


def test_metrics_port_is_checked() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        ComputeServerConfig(model="random:tiny", cache=("h:1",), metrics_port=70000)
    assert ComputeServerConfig(model="random:tiny", cache=("h:1",)).metrics_port is None
