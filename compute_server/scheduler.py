"""The compute thread: every model op of every request runs here, same-layer ops of requests in one batch.

Requests run their layer loops on their own threads (:class:`~.engine.Engine`), where they may block
on records without holding anyone up. Each model stage they need is an *op* queued here:

- ``project(layer, hidden, positions)``: input norm, q/k/v projections, RoPE;
- ``finish(layer, hidden, q, keys, values, num_past)``: attention over the request's own prefix
  K/V (one call per request: ragged), then o_proj, residual, MLP;
- ``embed(token_ids)``: the tokens' embeddings;
- ``logits(hidden)``: final norm and lm_head of the given rows (the last position's, for a token);
- ``call(fn, ...)``: anything else, alone (a whole prefill).

The compute thread groups the queued ``project`` and ``finish`` ops of one layer (and ``embed``
and ``logits`` ops) and runs a group as one pass over the requests' tokens concatenated (at most
``max_batch`` requests per pass; 1 turns batching off), so the weights of a layer are read once for
all of them. Which group runs next decides how full the passes are: a full group first, else the one
furthest behind in the model, so that requests which started apart catch up with each other and
then share passes, and under load move in waves that take turns (``_run_next``). The lm_head is
the largest single weight of a small model (Qwen2.5-0.5B: 136M of its 494M parameters), read once
per token of every request: batched, once per pass. Every op of the model's projections, MLP and
head is per token, so a batched pass gives each request what it gets alone, up to floating-point
summation order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from contiguouskv.compute_server.model.runner import ModelRunner

log = logging.getLogger(__name__)
T = TypeVar("T")
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _Op:
    kind: str  # "project" | "finish" | "embed" | "logits" | "call"
    layer: int
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    thread: int = field(default_factory=threading.get_ident)  # the request's thread
    follows: bool = True  # its thread submits another op soon (False: a look-ahead's lone projection)


_STAGE = {"project": 1, "finish": 2}  # within a layer; embed comes before layer 0, logits after the last
GroupKey = tuple[tuple[int, int], tuple[str, int] | int]  # (stage, key): see _group


def _group(op: _Op) -> GroupKey:
    """``(stage, key)``: ops of one key run in one pass; lower stages run first. A ``call`` (a whole
    prefill) is a group of its own and goes first. A look-ahead's projection (``follows`` False)
    runs alone, at its layer's stage: its rows never change the numbers of a request's own pass
    (a batched matmul may round differently), so a request's answer does not depend on when its
    look-ahead ran."""
    if op.kind == "call":
        return (-1, 0), id(op)
    if not op.follows:
        return (op.layer, _STAGE[op.kind]), id(op)
    if op.kind == "embed":
        return (-1, 1), ("embed", -1)
    if op.kind == "logits":
        return (1 << 30, 0), ("logits", -1)
    return (op.layer, _STAGE[op.kind]), (op.kind, op.layer)


def _census(pending: list[_Op]) -> tuple[dict[GroupKey, int], dict[GroupKey, float]]:
    """Per group of ``pending``: how many ops, and when its oldest op was queued."""
    count: dict[GroupKey, int] = {}
    since: dict[GroupKey, float] = {}
    for op in pending:
        key = _group(op)
        count[key] = count.get(key, 0) + 1
        since[key] = min(since.get(key, op.queued_at), op.queued_at)
    return count, since


@dataclass
class SchedulerStats:
    """Counters of the compute thread (read from any thread; approximate while it runs)."""

    passes: int = 0
    batched_passes: int = 0  # passes that served more than one request
    ops: int = 0
    largest_batch: int = 0
    batched_by_kind: dict[str, int] = field(default_factory=dict)  # op kind -> passes of more than one
    busy_s: float = 0.0  # seconds the compute thread spent running ops (the rest it waited for them)


class LayerScheduler:
    """Runs model ops on one thread; see the module docstring. ``close`` stops it."""

    _STARVE_S = 2.0  # an op waiting this long runs next, whatever its stage
    _GATHER_S = 0.01  # the longest the choice of a pass waits for requests due (see _run_next)
    _EXPECT_S = 0.05  # a request not back with its next op this long after its last is not waited for

    def __init__(self, runner: ModelRunner, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runner = runner
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = False  # the compute thread has seen close()'s marker
        self._pass_s = self._GATHER_S  # recent seconds per pass (bounds the wait for requests due)
        self._expected: dict[int, float] = {}  # thread -> when its last op ran (its next is due)
        self._thread = threading.Thread(target=self._loop, name="compute", daemon=True)
        self._thread.start()

    # --- request threads -------------------------------------------------------------------------
    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, *, follows: bool = True) -> QKV:
        """Blocks until the op ran: q ``[H, T, d]``, k and v ``[kvH, T, d]`` (see ModelRunner.project).

        ``follows=False``: no op of this thread follows soon (a policy's look-ahead on a helper
        thread), so no pass waits for one (see :meth:`_run_next`)."""
        return self._submit(_Op("project", layer, (hidden, positions), follows=follows)).future.result()

    def finish(self, layer: int, hidden: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               num_past: int) -> torch.Tensor:
        """Blocks until the op ran: attention of q over ``keys``/``values`` ``[kvH, num_past + T, d]``,
        then the rest of the layer; returns the hidden state leaving it ``[T, D]``."""
        return self._submit(_Op("finish", layer, (hidden, q, keys, values, num_past))).future.result()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Blocks until the op ran: embeddings ``[T, D]`` of ``token_ids`` ``[T]``."""
        return self._submit(_Op("embed", -1, (token_ids,))).future.result()  # type: ignore[no-any-return]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Blocks until the op ran: float32 logits ``[T, vocab]`` of the rows ``hidden`` ``[T, D]``."""
        return self._submit(_Op("logits", -1, (hidden,))).future.result()  # type: ignore[no-any-return]

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocks until ``fn(*args)`` ran on the compute thread, alone."""
        return self._submit(_Op("call", -1, (fn, *args))).future.result()  # type: ignore[no-any-return]

    def _submit(self, op: _Op) -> _Op:
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("the compute thread has stopped")
        self._queue.put(op)
        return op

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the ops already queued, and wait for it (a thread still running
        torch while the interpreter finalizes can abort the process)."""
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        while True:  # ops that raced the close: their requests learn it instead of waiting forever
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if op is not None and op.future.set_running_or_notify_cancel():
                op.future.set_exception(RuntimeError("the compute thread has stopped"))

    # --- the compute thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list[_Op] = []
        with torch.inference_mode():
            while True:
                if not pending and not self._take(pending, block=True):
                    return
                self._take(pending)
                if self._closing:  # close() fails whatever was queued after
                    while pending:
                        pending = self._run_next(pending)
                    return
                pending = self._run_next(pending)

    def _take(self, pending: list[_Op], block: bool = False, timeout: float | None = None) -> bool:
        """Move queued ops to ``pending`` until the queue is empty (the first wait blocks, up to
        ``timeout``, when ``block``) or the close marker comes; False when nothing came."""
        came = False
        while not self._closing:
            try:
                op = self._queue.get(block, timeout) if block else self._queue.get_nowait()
            except queue.Empty:
                break
            block = False
            if op is None:
                self._closing = True
                break
            came = True
            self._expected.pop(op.thread, None)
            pending.append(op)
        return came

    def _choose(self, pending: list[_Op]) -> GroupKey:
        """The group to run next (see :meth:`_run_next`)."""
        oldest = min(pending, key=lambda op: op.queued_at)
        if time.monotonic() - oldest.queued_at >= self._STARVE_S:
            return _group(oldest)
        count, since = _census(pending)
        full = [key for key, n in count.items() if n >= self.max_batch]
        if full:
            return min(full, key=since.__getitem__)
        return min(count, key=lambda g: g[0])

    def _run_next(self, pending: list[_Op]) -> list[_Op]:
        """Run one pass; the ops left for later.

        - A full group (``max_batch`` ops of one stage) runs first, the one waiting longest first.
          Under load, requests move in waves of ``max_batch``: while one wave runs its layers, the
          requests that arrive meanwhile gather at their first stage into the next wave, and the
          waves take turns. (With ``max_batch`` 1 every op is a full group: first come, first served.)
        - Else the group furthest behind in the model runs (laggards first): a request behind the
          others runs its layers, alone or with those as far behind, until it reaches the stage
          where the others wait, and from there moves with them in one pass. First come first
          served would run every op as it came, so requests that started at different times stay at
          different layers and few share a pass.
        - An op that has waited ``_STARVE_S`` runs next whatever its stage, so that no rule above
          holds a request back for long.

        Before choosing, unless a full group waits, the compute thread waits for the requests whose
        op has just run to submit their next one: up to ``_GATHER_S``, and never longer than recent
        passes took (a later pass of the late ones would cost about that; a small model's pass takes
        far less than 10 ms). Their threads need a moment (a wake-up, the GIL, the layer's records).
        Without the wait a wave splits into a pass of the quick ones and a pass of the rest, and new
        requests trickling in run in passes of one or two while the wave they would soon join is not
        yet back. Waiting only for requests due at the chosen stage or before it was tried: fewer
        requests per pass (11.4 against 13.8, in two ``bench load`` runs, docs/benchmarks.md)."""
        deadline = time.monotonic() + min(self._GATHER_S, self._pass_s)
        while not self._closing and self._due() and not self._full_group(pending):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._take(pending, block=True, timeout=left)
        key = self._choose(pending)
        group = [op for op in pending if _group(op) == key][: self.max_batch]
        chosen = {id(op) for op in group}
        run = {"call": self._call, "project": self._project, "finish": self._finish, "embed": self._embed,
               "logits": self._logits}[group[0].kind]
        self._run(group, run)
        return [op for op in pending if id(op) not in chosen]

    def _full_group(self, pending: list[_Op]) -> bool:
        return any(n >= self.max_batch for n in _census(pending)[0].values())

    def _due(self) -> bool:
        """Whether a request whose op ran moments ago (``_EXPECT_S``) is still to submit its next op.
        Forgets requests that did not come back in time."""
        now = time.monotonic()
        for thread, since in list(self._expected.items()):
            if now - since > self._EXPECT_S:
                del self._expected[thread]
        return bool(self._expected)

    def _expect_next(self, ops: list[_Op]) -> None:
        """Note that each request of the pass will submit its next op soon (all but the last op of a
        request: its logits, or a lone call)."""
        if self.max_batch == 1:
            return
        now = time.monotonic()
        for op in ops:
            if op.kind in ("embed", "project", "finish") and op.follows:
                self._expected[op.thread] = now

    def _run(self, ops: list[_Op], run: Callable[[list[_Op]], list[Any]]) -> None:
        live = [op for op in ops if op.future.set_running_or_notify_cancel()]
        if not live:
            return
        s = self.stats
        s.passes, s.ops = s.passes + 1, s.ops + len(live)
        s.largest_batch = max(s.largest_batch, len(live))
        if len(live) > 1:
            s.batched_passes += 1
            s.batched_by_kind[live[0].kind] = s.batched_by_kind.get(live[0].kind, 0) + 1
        started = time.perf_counter()
        try:
            results = run(live)
        except BaseException as exc:  # noqa: BLE001 - every waiter learns of it
            for op in live:
                op.future.set_exception(exc)
            return
        finally:
            took = time.perf_counter() - started
            s.busy_s += took
            self._pass_s += (took - self._pass_s) / 8  # a moving average of the last passes
        self._expect_next(live)
        for op, result in zip(live, results):
            op.future.set_result(result)

    @staticmethod
    def _call(ops: list[_Op]) -> list[Any]:
        fn, *args = ops[0].args
        return [fn(*args)]

    def _project(self, ops: list[_Op]) -> list[QKV]:
        layer = ops[0].layer
        if len(ops) == 1:
            return [self.runner.project(layer, *ops[0].args)]
        sizes = [op.args[0].shape[0] for op in ops]
        hidden = torch.cat([op.args[0] for op in ops])  # [sum T, D]
        positions = torch.cat([op.args[1] for op in ops])
        q, k, v = self.runner.project(layer, hidden, positions)
        return [(qi.contiguous(), ki.contiguous(), vi.contiguous())
                for qi, ki, vi in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))]

    def _embed(self, ops: list[_Op]) -> list[torch.Tensor]:
        return self._rowwise(ops, self.runner.embed)

    def _logits(self, ops: list[_Op]) -> list[torch.Tensor]:
        # copies, so that a request keeping its logits does not keep the whole pass's [sum T, vocab]
        return [part.clone() if len(ops) > 1 else part for part in self._rowwise(ops, self.runner.logits)]

    @staticmethod
    def _rowwise(ops: list[_Op], fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``fn`` of every op's rows as one call (``fn`` is per row), split back per op."""
        if len(ops) == 1:
            return [fn(ops[0].args[0])]
        sizes = [op.args[0].shape[0] for op in ops]
        return list(fn(torch.cat([op.args[0] for op in ops])).split(sizes))

    def _finish(self, ops: list[_Op]) -> list[torch.Tensor]:
        layer, r = ops[0].layer, self.runner
        attended = [r.attend(q, keys, values, num_past) for _, q, keys, values, num_past in (op.args for op in ops)]
        if len(ops) == 1:
            return [r.finish(layer, ops[0].args[0], attended[0])]
        sizes = [op.args[0].shape[0] for op in ops]
        hidden = r.finish(layer, torch.cat([op.args[0] for op in ops]), torch.cat(attended))  # [sum T, D]
        return list(hidden.split(sizes))


class ScheduledProjector:
    """The policies' view of the model (``policies.base.Projector``): projections run as scheduler ops."""

    def __init__(self, scheduler: LayerScheduler) -> None:
        self._scheduler = scheduler

    @property
    def scaling(self) -> float:
        return self._scheduler.runner.scaling

    @property
    def device(self) -> torch.device:
        return self._scheduler.runner.device

    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, *, aside: bool = False) -> QKV:
        return self._scheduler.project(layer, hidden, positions, follows=not aside)
