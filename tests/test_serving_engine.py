"""The compute server as a serving engine: batched layer passes, admission, cancellation, shutdown.

All against real servers: a cache server subprocess, and the compute server either in-process (to
read its scheduler's counters) or as a subprocess (signals, RSS, the cache server's stream counts).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from contiguouskv import launch
from contiguouskv.client import (
    NO_RETRY, ContiguousKVClient, ContiguousKVError, DeadlineExceededError, ReprefillResult, ResourceExhaustedError,
    UnavailableError,
)
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.config import ComputeServerConfig, default_cache_dir
from contiguouskv.compute_server.core import ComputeCore
from contiguouskv.compute_server.model.loading import LoadedModel, load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.request import ReprefillArgs, ReprefillReport
from contiguouskv.compute_server.servicer import _reply
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc, compute_pb2

MODEL = "random:tiny"
POLICIES = ("recompute", "full", "contiguous", "contiguous+", "h2o", "impress")


@pytest.fixture(scope="module")
def cache() -> Iterator[launch.ServiceProcess]:
    root = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) / f"ckv-serving-{os.getpid()}"
    try:
        with launch.cache_server(root) as proc:
            yield proc
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(MODEL, cache_dir=default_cache_dir())


def _stats(address: str, channel: grpc.Channel | None = None) -> cache_pb2.GetStatsResponse:
    if channel is None:
        with grpc.insecure_channel(address) as own:
            return _stats(address, own)
    return cache_pb2_grpc.CacheServiceStub(channel).GetStats(cache_pb2.GetStatsRequest(), timeout=10)


def _close(a: list[float], b: list[float]) -> bool:
    scale = max(abs(x) for x in a)
    return max(abs(x - y) for x, y in zip(a, b)) <= 1e-4 * scale


# --- batched layer passes ------------------------------------------------------------------------
def _answers(model: LoadedModel, address: str, max_batch: int, prefix: list[int],
             cases: list[tuple[str, float, list[int]]], together: bool) -> tuple[list[ReprefillReport], int]:
    async def main() -> tuple[list[ReprefillReport], int]:
        config = ComputeServerConfig(model=MODEL, cache=(address,), device="cpu", dtype="float32", max_batch=max_batch)
        client = CacheClient(config.cache, config.max_message_bytes, 60.0)
        core = ComputeCore(config, model, ModelRunner(model), client)
        try:
            reg = await core.register(prefix, ["impress"])
            args = [ReprefillArgs(reg.prefix_id, q, p, b, max_new_tokens=3, return_logits=True) for p, b, q in cases]
            if together:
                out = list(await asyncio.gather(*(core.reprefill(a) for a in args)))
            else:
                out = [await core.reprefill(a) for a in args]
            return out, core.scheduler.stats.batched_passes
        finally:
            await asyncio.gather(*core._reports, return_exceptions=True)
            core.close()
            await client.close()

    return asyncio.run(main())


def test_a_mixed_batch_answers_every_request_as_it_is_answered_alone(cache: launch.ServiceProcess,
                                                                    model: LoadedModel) -> None:
    rng = random.Random(11)
    prefix = [rng.randrange(512) for _ in range(260)]
    cases = [(p, b, [rng.randrange(512) for _ in range(rng.randint(1, 9))]) for p in POLICIES for b in (1.0, 0.3)]
    alone, batched_alone = _answers(model, cache.address, 1, prefix, cases, together=False)
    together, batched = _answers(model, cache.address, 8, prefix, cases, together=True)
    assert batched_alone == 0 and batched > 0  # the second run really shared passes
    for (policy, budget, _), a, b in zip(cases, alone, together):
        assert (a.token_id, a.outcome.generated_ids) == (b.token_id, b.outcome.generated_ids), (policy, budget)
        assert a.outcome.logits is not None and b.outcome.logits is not None
        assert _close(a.outcome.logits.tolist(), b.outcome.logits.tolist()), (policy, budget)


# --- admission -----------------------------------------------------------------------------------
def test_the_seventh_call_is_refused_and_queued_calls_hold_no_fetch_stream(cache: launch.ServiceProcess) -> None:
    args = ("--dtype", "float32", "--max-active-requests", "2", "--max-queued-requests", "4")
    with launch.compute_server(MODEL, cache.address, *args) as compute:
        with ContiguousKVClient(compute.address, timeout=120, retry=NO_RETRY) as client:
            prefix = client.register(token_ids=list(range(100, 400))).prefix_id
            results: list[ReprefillResult | ContiguousKVError] = []
            lock = threading.Lock()

            def call() -> None:
                try:
                    r: ReprefillResult | ContiguousKVError = client.reprefill(prefix, [1, 2, 3], policy="full",
                                                                            max_new_tokens=500)
                except ContiguousKVError as err:
                    r = err
                with lock:
                    results.append(r)

            threads = [threading.Thread(target=call) for _ in range(7)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            streams = []
            while any(t.is_alive() for t in threads):
                streams.append(_stats(cache.address).inflight_streams)
                time.sleep(0.05)
            for t in threads:
                t.join()
    refused = [r for r in results if isinstance(r, ContiguousKVError)]
    assert len(refused) == 1 and isinstance(refused[0], ResourceExhaustedError), results
    assert "max_queued_requests=4" in str(refused[0]) and "max_active_requests=2" in str(refused[0])
    assert len([r for r in results if isinstance(r, ReprefillResult)]) == 6
    assert max(streams) <= 2 and len(streams) > 5  # the 4 queued calls never opened a Fetch stream


# --- cancellation chaos --------------------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(_fd_targets(pid))


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return sorted(out)


def test_cancelled_calls_at_any_moment_leave_the_server_serving_and_clean(cache: launch.ServiceProcess) -> None:
    rng = random.Random(7)
    with launch.compute_server(MODEL, cache.address, "--dtype", "float32", "--max-active-requests", "8") as compute:
        with ContiguousKVClient(compute.address, timeout=120, retry=NO_RETRY) as client:
            prefix = client.register(token_ids=[rng.randrange(512) for _ in range(700)],
                                     extra_layouts=["impress"]).prefix_id
            queries = {p: [rng.randrange(512) for _ in range(9)] for p in POLICIES}

            def ask(policy: str, timeout: float | None = None, new: int = 0) -> ReprefillResult:
                budget = None if policy in ("recompute", "full") else 0.2
                return client.reprefill(prefix, queries[policy], policy=policy, budget=budget, max_new_tokens=new,
                                        return_logits=True, timeout=timeout)

            reference = {p: ask(p, new=4) for p in POLICIES}
            normal_s = {}
            for p in POLICIES:
                start = time.perf_counter()
                ask(p, new=4)
                normal_s[p] = time.perf_counter() - start
            mismatches: list[str] = []
            outcomes = {"cancelled": 0, "answered": 0}

            def chaos(seed: int, calls: int = 50) -> None:
                r = random.Random(seed)
                for _ in range(calls):
                    policy = r.choice(POLICIES)
                    try:
                        ask(policy, timeout=max(1e-3, r.uniform(0.0, 2.0) * normal_s[policy]), new=4)
                        outcomes["answered"] += 1
                    except DeadlineExceededError:
                        outcomes["cancelled"] += 1

            warm = [threading.Thread(target=chaos, args=(100 + s,)) for s in range(4)]
            for t in warm:  # one round of the same mix first: the request threads, malloc arenas and
                # connections it leaves are the idle state; the measured round below must not add to them
                t.start()
            for t in warm:
                t.join()
            stats = grpc.insecure_channel(cache.address)  # one connection, counted in the idle state
            _stats(cache.address, stats)
            idle_fds = _fds(cache.proc.pid)
            idle_targets = _fd_targets(cache.proc.pid)
            time.sleep(1.5)  # idle: the server has given back what the warm-up round left (core.IDLE_TRIM_S)
            rss_start = _rss_kib(compute.proc.pid)
            outcomes = {"cancelled": 0, "answered": 0}

            def normal() -> None:
                for i in range(18):
                    policy = POLICIES[i % len(POLICIES)]
                    got = ask(policy, new=4)
                    want = reference[policy]
                    if got.token_id != want.token_id or got.generated_ids != want.generated_ids \
                            or not _close(want.logits, got.logits):
                        mismatches.append(policy)

            threads = [threading.Thread(target=chaos, args=(s,)) for s in range(4)]
            threads.append(threading.Thread(target=normal))
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
            assert not any(t.is_alive() for t in threads)
            assert mismatches == [] and outcomes["cancelled"] >= 50, (mismatches, outcomes)
            deadline = time.monotonic() + 2.0
            while (_stats(cache.address, stats).inflight_streams or _fds(cache.proc.pid) > idle_fds) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _stats(cache.address, stats).inflight_streams == 0
            extra = collections.Counter(_fd_targets(cache.proc.pid)) - collections.Counter(idle_targets)
            assert _fds(cache.proc.pid) <= idle_fds, f"descriptors opened and kept: {dict(extra)}"
            for policy in POLICIES:  # still serving, same answers
                assert ask(policy, new=4).generated_ids == reference[policy].generated_ids
            # Idle, the server gives back what malloc kept for requests (common/malloc.py). Measured:
            # within 5 % of the idle state after the warm-up round in three runs, +6.9 % once on a
            # fresh clone under load, so the bound is 10 %; a leak of the round's requests (200 x
            # their K/V, threads) would far exceed it.
            deadline = time.monotonic() + 5.0
            while _rss_kib(compute.proc.pid) > 1.05 * rss_start and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _rss_kib(compute.proc.pid) <= 1.10 * rss_start, (rss_start, _rss_kib(compute.proc.pid))
            stats.close()
            for _ in range(3):  # streams the client leaves after the first tokens
                for index, _token in enumerate(client.generate(prefix, queries["full"], max_new_tokens=40)):
                    if index == 1:
                        break
            assert ask("full", new=4).generated_ids == reference["full"].generated_ids
        # every cancelled call's error was dealt with: none left for asyncio to report at exit
        log = compute.log_tail(100_000)
        assert "never retrieved" not in log and " ERROR " not in log, log[-3000:]


# --- shutdown ------------------------------------------------------------------------------------
def test_sigterm_ends_running_and_queued_calls_with_unavailable_and_exits_within_the_grace(
        cache: launch.ServiceProcess) -> None:
    args = ("--dtype", "float32", "--max-active-requests", "2", "--max-queued-requests", "8")
    compute = launch.compute_server(MODEL, cache.address, *args, env={"CKV_GRACE_SECONDS": "3"})
    compute.wait_ready()
    results: list[tuple[float, BaseException | ReprefillResult]] = []
    start = float("inf")
    try:
        with ContiguousKVClient(compute.address, timeout=120, retry=NO_RETRY) as client:
            prefix = client.register(token_ids=list(range(50, 350))).prefix_id

            def call() -> None:
                try:
                    r: BaseException | ReprefillResult = client.reprefill(prefix, [4, 5], policy="contiguous",
                                                                          budget=0.5, max_new_tokens=512)
                except ContiguousKVError as err:
                    r = err
                results.append((time.monotonic(), r))

            threads = [threading.Thread(target=call) for _ in range(4)]  # 2 running, 2 queued
            for t in threads:
                t.start()
            time.sleep(1.0)
            start = time.monotonic()
            compute.proc.send_signal(signal.SIGTERM)
            assert compute.proc.wait(timeout=10) == 0
            exited_s = time.monotonic() - start
            for t in threads:
                t.join(timeout=30)
    finally:
        compute.stop()
    assert exited_s < 3.0 + 3.0, exited_s  # the 3 s grace, and the process's own teardown (slow on a loaded machine)
    assert len(results) == 4, results
    late = [(at - start, r) for at, r in results if at >= start]  # a call may have finished before the signal
    refused = [r for _, r in late if isinstance(r, UnavailableError) and "shutting down" in str(r)]
    assert len(refused) >= 2, results  # the two queued calls at least
    # anything else after the signal is a running call that finished within the first half of the
    # grace, as the server allows (docs/operations.md); 1 s of slack for the client to see it
    assert all(isinstance(r, ReprefillResult) and after <= 3.0 / 2 + 1.0
               for after, r in late if not any(r is x for x in refused)), results


# --- the compute floor (measure_floor) -----------------------------------------------------------
def test_measure_floor_reruns_the_query_over_resident_kv_off_the_clock(cache: launch.ServiceProcess,
                                                                      model: LoadedModel,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[tuple[str, ReprefillReport, ReprefillReport]]:
        config = ComputeServerConfig(model=MODEL, cache=(cache.address,), device="cpu", dtype="float32")
        client = CacheClient(config.cache, config.max_message_bytes, 60.0)
        core = ComputeCore(config, model, ModelRunner(model), client)
        try:
            reg = await core.register([random.Random(5).randrange(512) for _ in range(300)], ["impress"])
            out = []
            for policy in POLICIES:
                plain = await core.reprefill(ReprefillArgs(reg.prefix_id, [4, 5, 6], policy, 0.3))
                floor = await core.reprefill(ReprefillArgs(reg.prefix_id, [4, 5, 6], policy, 0.3, measure_floor=True))
                out.append((policy, plain, floor))
            return out
        finally:
            await asyncio.gather(*core._reports, return_exceptions=True)
            core.close()
            await client.close()

    for policy, plain, floor in asyncio.run(main()):
        assert plain.resident_s is None and floor.resident_s is not None and floor.resident_s > 0, policy
        assert floor.token_id == plain.token_id, policy  # measuring changes nothing of the answer
        if policy == "recompute":
            assert floor.resident_s == floor.outcome.first_token_s  # nothing loaded: its compute is the floor
        else:  # the re-run's own clock, not the request's. Which of the two is shorter is not asserted:
            # on a 300-token prefix both are ~10 ms and their order is the machine's noise (a fresh
            # clone's suite once saw 16 ms against 11); the bench shows it on 16K-token prefixes.
            assert floor.resident_s not in (floor.ttft_s, floor.outcome.first_token_s), policy
    assert "resident re-run answered" not in caplog.text  # the re-run reproduced every answer


def test_the_response_splits_the_compute_time_into_selection_staging_model_and_the_rest(
        cache: launch.ServiceProcess, model: LoadedModel) -> None:
    """Timings: fetch wait + selection + staging + model + other = TTFT, each part non-negative; only
    the policies that score spend time selecting, and every loading policy spends time staging."""
    async def main() -> list[tuple[str, compute_pb2.Timings]]:
        config = ComputeServerConfig(model=MODEL, cache=(cache.address,), device="cpu", dtype="float32")
        client = CacheClient(config.cache, config.max_message_bytes, 60.0)
        core = ComputeCore(config, model, ModelRunner(model), client)
        try:
            reg = await core.register([random.Random(6).randrange(512) for _ in range(300)], ["impress"])
            return [(policy, _reply(await core.reprefill(ReprefillArgs(reg.prefix_id, [4, 5, 6], policy, 0.3))).timings)
                    for policy in ("full", "contiguous", "contiguous+", "impress")]
        finally:
            await asyncio.gather(*core._reports, return_exceptions=True)
            core.close()
            await client.close()

    for policy, t in asyncio.run(main()):
        parts = (t.fetch_wait_ms, t.selection_ms, t.staging_ms, t.model_ms, t.other_ms)
        assert sum(parts) == pytest.approx(t.ttft_ms, rel=1e-6), policy
        assert min(parts[:4]) >= 0 and t.other_ms > -0.05 * t.ttft_ms, (policy, parts)
        assert t.model_ms > 0 and t.staging_ms > 0, (policy, parts)
        assert (t.selection_ms > 0) == (policy != "full"), (policy, parts)
