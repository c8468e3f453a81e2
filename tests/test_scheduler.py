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
from contiguouskv.compute_server.scheduler import LayerScheduler


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(load_model("random:tiny", cache_dir=default_cache_dir()))


def _queued_together(scheduler: LayerScheduler, submit: list, ops: int) -> list:
    """Run ``submit`` (callables returning a result) from threads while the compute thread is held
    busy, so that all of them wait in its queue at once, then let it go; their results in order."""
    release = threading.Event()
    held = threading.Thread(target=scheduler.call, args=(release.wait,))
    held.start()
    results: list = [None] * len(submit)

    def one(k: int) -> None:
        results[k] = submit[k]()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(submit))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while scheduler._queue.qsize() < ops and time.monotonic() < deadline:
        time.sleep(0.005)
    assert scheduler._queue.qsize() == ops
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
    release = threading.Event()
    held = threading.Thread(target=scheduler.call, args=(release.wait,))
    held.start()
    results: dict[str, object] = {}

    def before() -> None:
        results["before"] = scheduler.embed(torch.tensor([3]))

    t = threading.Thread(target=before)
    t.start()
    while scheduler._queue.qsize() < 1:
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
