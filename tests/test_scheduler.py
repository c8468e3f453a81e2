"""The compute thread's batching of per-row ops (embeddings, logits) across requests: one pass, the
same rows as alone. Pure model code on the CPU, no servers."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model.loading import load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.scheduler import LayerScheduler, _Op


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(load_model("random:tiny", cache_dir=default_cache_dir()))


def _hold(scheduler: LayerScheduler) -> tuple[threading.Thread, threading.Event]:
    """Hold the compute thread inside a call until the returned event is set (at most 30 s); returns
    once it is inside, so that every op submitted from now on stays in its queue."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    held = threading.Thread(target=scheduler.call, args=(hold,), daemon=True)
    held.start()
    assert entered.wait(10)
    return held, release


def _queued_together(scheduler: LayerScheduler, submit: list, ops: int) -> list:
    """Run ``submit`` (callables returning a result) from threads while the compute thread is held
    busy, so that all of them wait in its queue at once, then let it go; their results in order."""
    held, release = _hold(scheduler)
    results: list = [None] * len(submit)

    def one(k: int) -> None:
        results[k] = submit[k]()

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(submit))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while scheduler._queue.qsize() < ops and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler._queue.qsize() == ops
    finally:
        release.set()
        for t in [held, *threads]:
            t.join(10)
    return results


def test_logits_of_several_requests_are_one_pass_and_each_gets_its_own_rows(runner: ModelRunner) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [runner.embed(torch.randint(0, 512, (n,), generator=gen)) for n in (1, 3, 2)]
    scheduler = LayerScheduler(runner, max_batch=8)
    try:
        got = _queued_together(scheduler, [lambda r=r: scheduler.logits(r) for r in rows], len(rows))
        assert scheduler.stats.batched_by_kind == {"logits": 1}
    finally:
        scheduler.close()
    for r, g in zip(rows, got):
        alone = runner.logits(r)
        assert g.shape == alone.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, alone, rtol=1e-5, atol=1e-5)
        assert g.untyped_storage().nbytes() == g.numel() * 4  # a copy, not a view of the whole pass


def test_embeddings_batch_and_max_batch_one_turns_batching_off(runner: ModelRunner) -> None:
    ids = [torch.tensor([1, 2, 3]), torch.tensor([7]), torch.tensor([9, 9])]
    for max_batch, batched in ((4, {"embed": 1}), (1, {})):
        scheduler = LayerScheduler(runner, max_batch=max_batch)
        try:
            got = _queued_together(scheduler, [lambda i=i: scheduler.embed(i) for i in ids], len(ids))
            assert scheduler.stats.batched_by_kind == batched
        finally:
            scheduler.close()
        for i, g in zip(ids, got):
            assert torch.equal(g, runner.embed(i))


def test_ops_queued_before_close_still_run_and_later_ones_fail(runner: ModelRunner) -> None:
    scheduler = LayerScheduler(runner, max_batch=4)
    held, release = _hold(scheduler)
    results: dict[str, object] = {}

    def before() -> None:
        results["before"] = scheduler.embed(torch.tensor([3]))

    t = threading.Thread(target=before)
    t.start()
    deadline = time.monotonic() + 10
    while scheduler._queue.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    while not scheduler._closed:
        time.sleep(0.002)
    release.set()
    for x in (held, t, closer):
        x.join(10)
    assert torch.equal(results["before"], runner.embed(torch.tensor([3])))
    with pytest.raises(RuntimeError, match="stopped"):
        scheduler.embed(torch.tensor([3]))


def _op(kind: str, layer: int, age: float = 0.0) -> _Op:
    return _Op(kind, layer, (), queued_at=time.monotonic() - age)


def test_the_group_furthest_behind_runs_first_while_no_group_is_full(runner: ModelRunner) -> None:
    scheduler = LayerScheduler(runner, max_batch=4)
    try:
        pending = [_op("finish", 1, 0.3), _op("project", 1, 0.2), _op("logits", -1, 0.1), _op("finish", 0)]
        assert scheduler._choose(pending)[1] == ("finish", 0)
        assert scheduler._choose([*pending, _op("embed", -1)])[1] == ("embed", -1)
        assert scheduler._choose(pending[:3])[1] == ("project", 1)
    finally:
        scheduler.close()


def test_a_full_group_runs_first_and_of_two_the_one_waiting_longer(runner: ModelRunner) -> None:
    scheduler = LayerScheduler(runner, max_batch=2)
    try:
        wave_a = [_op("finish", 5, 0.2), _op("finish", 5, 0.2)]
        wave_b = [_op("project", 0, 0.3), _op("project", 0, 0.1)]
        assert scheduler._choose([_op("embed", -1), *wave_a])[1] == ("finish", 5)  # full beats behind
        assert scheduler._choose([_op("embed", -1), *wave_a, *wave_b])[1] == ("project", 0)  # older
        assert scheduler._choose([*wave_a, _op("embed", -1), *wave_b[1:]])[1] == ("finish", 5)
    finally:
        scheduler.close()


def test_an_op_waiting_too_long_runs_next_and_max_batch_one_is_first_come_first_served(runner: ModelRunner) -> None:
    scheduler = LayerScheduler(runner, max_batch=4)
    try:
        starving = _op("finish", 9, LayerScheduler._STARVE_S + 0.1)
        assert scheduler._choose([_op("embed", -1), starving, _op("project", 0)])[1] == ("finish", 9)
    finally:
        scheduler.close()
    scheduler = LayerScheduler(runner, max_batch=1)
    try:
        assert scheduler._choose([_op("finish", 3, 0.2), _op("embed", -1, 0.1)])[1] == ("finish", 3)
    finally:
        scheduler.close()


class _Slowed:
    """The real runner, each layer op taking ``delay`` seconds more: the compute thread is the
    bottleneck, as under load."""

    def __init__(self, runner: ModelRunner, delay: float) -> None:
        self._runner, self._delay = runner, delay

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def project(self, *args):
        time.sleep(self._delay)
        return self._runner.project(*args)

    def finish(self, *args):
        time.sleep(self._delay)
        return self._runner.finish(*args)


def test_staggered_requests_join_one_pass_and_each_gets_what_it_gets_alone(runner: ModelRunner) -> None:
    """Four requests start one after another, each a layer loop of project/finish ops as the engine
    runs it; the later ones catch up (laggards first) and share passes with the first."""
    gen = torch.Generator().manual_seed(1)
    queries = [runner.embed(torch.randint(0, 512, (3,), generator=gen)) for _ in range(4)]

    def loop(s: LayerScheduler, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[0])
        for layer in range(runner.num_layers):
            q, k, v = s.project(layer, hidden, positions)
            hidden = s.finish(layer, hidden, q, k, v, 0)
        return s.logits(hidden[-1:])

    one = LayerScheduler(runner, max_batch=1)
    try:
        alone = [loop(one, h) for h in queries]
    finally:
        one.close()
    scheduler = LayerScheduler(_Slowed(runner, 0.01), max_batch=4)  # type: ignore[arg-type]
    got: list = [None] * 4
    try:
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, loop(scheduler, queries[k]))) for k in range(4)]
        for t in threads:  # each starts while the ones before are a few layer ops in
            t.start()
            time.sleep(0.025)
        for t in threads:
            t.join(30)
        stats = scheduler.stats
    finally:
        scheduler.close()
    for a, g in zip(alone, got):
        torch.testing.assert_close(g, a, rtol=1e-4, atol=1e-4)
    passes_alone = 4 * (2 * runner.num_layers + 1)
    assert stats.ops == passes_alone and stats.batched_passes > 0
    assert stats.passes < passes_alone * 0.6, (stats.passes, passes_alone)


def test_the_wait_for_requests_due_shrinks_to_what_passes_take(runner: ModelRunner) -> None:
    """The wait before a choice is bounded by recent passes' time: on the tiny model (microseconds
    a pass) it falls far below the 10 ms cap, so a request that went to wait for records does not
    idle the compute thread longer than the pass it might save."""
    scheduler = LayerScheduler(runner, max_batch=4)
    try:
        assert scheduler._pass_s == LayerScheduler._GATHER_S
        for _ in range(40):
            scheduler.embed(torch.tensor([1, 2]))
        assert scheduler._pass_s < LayerScheduler._GATHER_S / 4
    finally:
        scheduler.close()


def test_a_look_ahead_projection_runs_alone_and_no_pass_waits_for_its_thread(runner: ModelRunner) -> None:
    """A policy's look-ahead projects off the request's thread (``follows=False``): it never joins a
    request's pass (its rows would change that pass's rounding), and its thread is not expected back,
    so no pass holds for it. Requests' own projections of the same layer still share one pass."""
    gen = torch.Generator().manual_seed(3)
    hidden = [runner.embed(torch.randint(0, 512, (n,), generator=gen)) for n in (4, 2, 3)]
    positions = [torch.arange(50, 50 + h.shape[0]) for h in hidden]
    scheduler = LayerScheduler(runner, max_batch=8)
    try:
        submit = [lambda h=h, p=p: scheduler.project(1, h, p) for h, p in zip(hidden[:2], positions[:2])]
        submit.append(lambda: scheduler.project(1, hidden[2], positions[2], follows=False))
        got = _queued_together(scheduler, submit, 3)
        assert scheduler.stats.batched_by_kind == {"project": 1}  # the two requests' ops; the look-ahead alone
        assert scheduler.stats.passes == 3  # the hold, the requests' pass, the look-ahead's
        scheduler._expected.clear()
        scheduler._expect_next([_Op("project", 1, (), thread=1), _Op("project", 1, (), thread=2, follows=False)])
        assert set(scheduler._expected) == {1}  # a request's thread is expected back; the look-ahead's is not
    finally:
        scheduler.close()
    for g, h, p in zip(got, hidden, positions):
        alone = runner.project(1, h, p)
        for a, b in zip(g, alone):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got[2], runner.project(1, hidden[2], positions[2])))
