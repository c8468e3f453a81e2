"""Re-Prefill computation of one request: prefix prefill, query over prefix KV, decoding.

A request's layer loop runs on that request's own thread; every model stage it needs runs as an op
on the compute thread (:class:`~.scheduler.LayerScheduler`), batched with the same stage of other
requests. Prefix KV comes from a :class:`PrefixKVSource` (a loading policy), which blocks the
request's thread (and only it) until that layer's records have arrived, so a layer starts the
moment its own records are in. A request whose job is cancelled stops at its next layer or
decoding step with CANCELLED (or the reason it was given).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.layouts.base import PrefilledPrefix
from contiguouskv.compute_server.scheduler import LayerScheduler
from contiguouskv.compute_server.workspace import Workspace

TokenCallback = Callable[[int, int], None]
"""Called on the request's thread with (index, token id) as each token is computed; index 0 = first."""


class PrefixKVSource(Protocol):
    """Supplies each layer's prefix K/V; both methods are called in layer order on the request's thread."""

    selection_s: float
    """Seconds the source spent selecting on the request's thread (identification decoding, scoring,
    speculative projections), waits for data excluded."""

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Sees the hidden state [T, D] entering ``layer`` (a chance to look ahead); must not block long."""
        ...

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Prefix K and V for ``layer`` ([kv_heads, s, d] each) given the query's q [heads, T, d] and
        k [kv_heads, T, d] at that layer, and the seconds spent blocked waiting for records."""
        ...

    def layer_consumed(self, layer: int) -> None:
        """The engine copied ``layer``'s prefix K/V into its attention input and will not read the
        tensors :meth:`wait_for_layer_load` returned again: their memory may be reused."""
        ...


@dataclass
class LayerRun:
    """When one layer of a query ran: seconds blocked on records, seconds computing."""

    layer: int
    wait_s: float
    compute_s: float
    started_s: float = 0.0  # time.perf_counter() when the layer started (for tracing)


@dataclass
class QueryOutcome:
    """What one Re-Prefill computed: the first token and the greedy continuation."""

    token_id: int
    generated_ids: list[int] = field(default_factory=list)
    layers: list[LayerRun] = field(default_factory=list)
    first_token_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0
    decode_s: float = 0.0
    logits: torch.Tensor | None = None  # float32 [vocab] at the last query position
    # Where compute_s went, on the request's thread (they sum to at most compute_s):
    selection_s: float = 0.0  # selecting chunks or tokens (the source's selection_s)
    staging_s: float = 0.0  # gathering records into tensors and joining them with the query's K/V
    model_s: float = 0.0  # the model's own ops (embedding, layers, head), queueing for the compute thread included


class Cancellation:
    """Set from any thread; the request's thread raises it at its next layer or decoding step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.error: ComputeError = ComputeError("request cancelled", code="CANCELLED")

    def cancel(self, error: ComputeError | None = None) -> None:
        """Cancel (the first ``error`` given is the one raised); runs the callbacks once."""
        with self._lock:
            if self._event.is_set():
                return
            if error is not None:
                self.error = error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the cancelling thread) when cancelled; at once if it already is."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise self.error


@dataclass(frozen=True)
class QueryJob:
    """One query to answer: its tokens after ``num_prefix`` prefix tokens, and how far to decode."""

    query_ids: list[int]
    num_prefix: int
    max_new_tokens: int = 0
    eos_ids: tuple[int, ...] = ()
    on_token: TokenCallback | None = None
    cancellation: Cancellation = field(default_factory=Cancellation)
    # With a list: every layer's prefix K/V as attended, kept for :meth:`Engine.resident`.
    resident: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class Engine:
    """Runs prefills and queries through a :class:`LayerScheduler`; owns no I/O."""

    def __init__(self, scheduler: LayerScheduler, *, prefill_block: int, importance_window: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.scheduler = scheduler
        self._kv_dtype = kv_dtype
        self.runner = scheduler.runner
        self._block = prefill_block
        self._window = importance_window

    def prefill_prefix(self, token_ids: list[int]) -> PrefilledPrefix:
        """Full prefill of the prefix: K/V in the storage dtype (``kv_dtype``, else the compute
        dtype) on the CPU, and the last
        ``importance_window`` queries of every layer for the layouts' static importance."""
        r = self.runner
        w = min(self._window, len(token_ids))
        result = self.scheduler.call(r.prefill, torch.tensor(token_ids), self._block, w)
        kv = self._kv_dtype or r.dtype
        return PrefilledPrefix(list(token_ids), [k.to("cpu", kv) for k in result.keys],
                               [v.to("cpu", kv) for v in result.values],
                               [q.cpu() for q in result.last_queries], r.scaling)

    def answer(self, job: QueryJob, source: PrefixKVSource) -> QueryOutcome:
        """First token of prefix + query, prefix KV from ``source``; then greedy decoding."""
        r, s = self.runner, self.scheduler
        start = time.perf_counter()
        device = r.device
        num_prefix = job.num_prefix
        positions = torch.arange(num_prefix, num_prefix + len(job.query_ids), device=device)
        hidden = s.embed(torch.tensor(job.query_ids, device=device))
        out = QueryOutcome(token_id=-1)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        scratch = None if job.max_new_tokens else Workspace()  # decoding keeps every layer's K/V
        in_source = 0.0  # seconds inside the source's calls, waits included
        model = time.perf_counter() - start  # seconds in model ops: the embedding so far
        for layer in range(r.num_layers):
            job.cancellation.check()
            t0 = time.perf_counter()
            source.before_layer(layer, hidden, positions)
            t1 = time.perf_counter()
            q, k, v = s.project(layer, hidden, positions)
            t2 = time.perf_counter()
            pk, pv, wait = source.wait_for_layer_load(layer, q, k)
            pk, pv = pk.to(device=device), pv.to(device=device)  # join_kv converts to the compute dtype
            if job.resident is not None:
                job.resident.append((pk, pv))
            keys, values = join_kv(pk, k, scratch, "keys"), join_kv(pv, v, scratch, "values")  # [kv_heads, s + T, d]
            if job.resident is None:  # else the floor's re-run reads pk, pv again
                source.layer_consumed(layer)
            t3 = time.perf_counter()
            hidden = s.finish(layer, hidden, q, keys, values, pk.shape[1])
            if job.max_new_tokens:
                cache.append((keys, values))
            t4 = time.perf_counter()
            in_source += (t1 - t0) + (t3 - t2)
            model += (t2 - t1) + (t4 - t3)
            out.layers.append(LayerRun(layer, wait, t4 - t0 - wait, t0))
        t5 = time.perf_counter()
        out.logits = s.logits(hidden[-1:])[0].float().cpu()
        out.token_id = int(out.logits.argmax())
        out.first_token_s = time.perf_counter() - start
        out.wait_s = sum(t.wait_s for t in out.layers)
        out.compute_s = out.first_token_s - out.wait_s
        out.model_s = model + time.perf_counter() - t5
        out.selection_s = source.selection_s
        out.staging_s = max(0.0, in_source - out.wait_s - out.selection_s)
        self._continue(out, cache, num_prefix + len(job.query_ids), job)
        return out

    def resident(self, job: QueryJob) -> tuple[float, int]:
        """The query of ``job`` again over the prefix K/V its :meth:`answer` attended to, kept resident
        in ``job.resident``: the same kernels with no I/O, no selection and no record decoding.
        Returns the seconds to the first token (the request's compute floor) and that token."""
        r, s = self.runner, self.scheduler
        assert job.resident is not None and len(job.resident) == r.num_layers
        start = time.perf_counter()
        device = r.device
        positions = torch.arange(job.num_prefix, job.num_prefix + len(job.query_ids), device=device)
        hidden = s.embed(torch.tensor(job.query_ids, device=device))
        scratch = Workspace()  # as answer() does it: the floor gets no allocation the answer did not have
        for layer, (pk, pv) in enumerate(job.resident):
            job.cancellation.check()
            q, k, v = s.project(layer, hidden, positions)
            keys, values = join_kv(pk, k, scratch, "keys"), join_kv(pv, v, scratch, "values")
            hidden = s.finish(layer, hidden, q, keys, values, pk.shape[1])
        token = int(s.logits(hidden[-1:])[0].argmax())  # a host value: waits for the device
        return time.perf_counter() - start, token

    def recompute(self, prefix_ids: list[int], job: QueryJob) -> QueryOutcome:
        """Full prefill of prefix + query (no stored KV used)."""
        r = self.runner
        start = time.perf_counter()
        job.cancellation.check()
        result = self.scheduler.call(r.prefill, torch.tensor(prefix_ids + job.query_ids, device=r.device), self._block)
        logits = result.logits.reshape(-1).float().cpu()
        out = QueryOutcome(token_id=int(logits.argmax()), logits=logits)
        out.first_token_s = out.compute_s = time.perf_counter() - start
        cache = list(zip(result.keys, result.values)) if job.max_new_tokens else []
        self._continue(out, cache, len(prefix_ids) + len(job.query_ids), job)
        return out

    def _continue(self, out: QueryOutcome, cache: list[tuple[torch.Tensor, torch.Tensor]], position: int,
                  job: QueryJob) -> None:
        start = time.perf_counter()
        if job.on_token is not None:
            job.on_token(0, out.token_id)
        out.generated_ids = self._decode(out.token_id, cache, position, job)
        out.decode_s = time.perf_counter() - start

    def _decode(self, token: int, cache: list[tuple[torch.Tensor, torch.Tensor]], position: int,
                job: QueryJob) -> list[int]:
        """Greedy decoding, one token at a time; each layer's step is a scheduler op like any other."""
        r, s = self.runner, self.scheduler
        out: list[int] = []
        device = r.device
        if not job.max_new_tokens or token in job.eos_ids:
            return out
        # Each layer's K/V grows in place in a buffer with room for every new token: re-concatenating
        # the whole cache per token and layer copied O(prefix) bytes per step.
        length = cache[0][0].shape[1] if cache else 0
        buffers = []
        for keys, values in cache:
            kb = keys.new_empty((keys.shape[0], length + job.max_new_tokens, keys.shape[2]))
            vb = values.new_empty((values.shape[0], length + job.max_new_tokens, values.shape[2]))
            kb[:, :length], vb[:, :length] = keys, values
            buffers.append((kb, vb))
        cache.clear()
        for step in range(job.max_new_tokens):
            if token in job.eos_ids:
                break
            job.cancellation.check()
            hidden = s.embed(torch.tensor([token], device=device))
            pos = torch.tensor([position + step], device=device)
            for layer, (kb, vb) in enumerate(buffers):
                q, k, v = s.project(layer, hidden, pos)
                kb[:, length : length + 1], vb[:, length : length + 1] = k, v
                hidden = s.finish(layer, hidden, q, kb[:, : length + 1], vb[:, : length + 1], length)
            length += 1
            token = int(s.logits(hidden[-1:])[0].argmax())
            out.append(token)
            if job.on_token is not None:
                job.on_token(len(out), token)
        return out


def join_kv(prefix: torch.Tensor, own: torch.Tensor, scratch: Workspace | None, name: str) -> torch.Tensor:
    """``[prefix ; own]`` along tokens (``[kv_heads, s + T, d]``) in ``own``'s dtype (the prefix may
    be stored narrower: it is converted in the same copy): in ``scratch``'s buffer ``name`` (valid
    until the next layer) when given, else a new tensor that may be kept (decoding)."""
    s = prefix.shape[1]
    shape = (own.shape[0], s + own.shape[1], own.shape[2])
    out = scratch.get(name, shape, own.device, own.dtype) if scratch is not None else own.new_empty(shape)
    out[:, :s].copy_(prefix)
    out[:, s:].copy_(own)
    return out
