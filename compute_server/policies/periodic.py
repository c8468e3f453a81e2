"""Shared machinery of the period-based chunk policies (`contiguous`, `contiguous+`).

They share one chunk set per period of ``p`` layers, fetched in sub-periods of ``sp`` layers.
Before layer 0 they ship a prediction for period 0 (the prior: static importance stored at
registration). When period k's set S_k is known they request only S_k minus the prediction, cancel
the predicted chunks not in S_k, and ship S_k as the prediction for period k+1. Predictions go out
one request per chunk so each can be cancelled alone. Subclasses say how a period is scored.

Devices: identification keys and digests are decoded onto the compute device
(``self.projector.device``) through the codec, i.e. :func:`~..kvio.staging.to_device_now`, and
scored there; each period's chunk list is the one ``tolist`` (in ``select_top``), after which the
period's scores are copied to the host for the attention report. The stored importance prior is
only read on the event loop before layer 0 to pick period 0's prediction, so it stays on the host.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from concurrent.futures import Future
from typing import ClassVar

import torch

from contiguouskv.compute_server.cachenet.attention import RegionScores
from contiguouskv.compute_server.layouts.contiguous import sub_periods
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.compute_server.kvio.loader import Records
from contiguouskv.compute_server.policies.base import (
    STATS_PRIORITY, LoadingPolicy, LoadUsage, PeriodChoice, PolicyContext, chunk_usage,
)
from contiguouskv.compute_server.policies.feedback import attention_report
from contiguouskv.compute_server.selection.chunks import exact_chunk_scores, query_window, select_top
from contiguouskv.compute_server.workspace import Workspace


class PeriodicPolicy(LoadingPolicy):
    """One chunk set per period, predicted ahead; see the module docstring."""

    ident_region: ClassVar[str] = "idkeys"
    """The region read to score a period's first layer: ``idkeys`` (every key), ``digest``,
    ``qkeys`` or ``minmax``; read whole, through the server's identification cache."""
    follows_score_rule: ClassVar[bool] = False
    """Whether the server's ``score_heads`` and ``score_window`` apply; otherwise every query token
    scores and heads are summed, the paper's rule."""

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        assert isinstance(context.codec, ContiguousCodec), "periodic policies read the contiguous layout"
        self.codec = context.codec
        L, p = self.chunks.num_layers, self.params
        self.starts = list(range(0, L, p.period))
        self._runs = {s: [r for r in sub_periods(L, p.period, p.sub_period) if s <= r.start < s + p.period]
                      for s in self.starts}
        self._ident: dict[int, Future[Records]] = {}
        self._eval: dict[int, Future[Records]] = {}
        self._predicted: dict[int, dict[int, list[int]]] = {}
        self._selected: dict[int, list[int]] = {}
        self._pending_wait = 0.0
        self._layer = 0  # the layer the compute thread is on: waits are charged to it
        self._ident_read = [0] * L  # identification bytes read (not from the cache) per layer
        self._ident_cached = 0
        self._ident_wait = [0.0] * L
        self._recalls: dict[int, tuple[float, float]] = {}  # layer -> (set, mass) recall of the exact top-k
        self.periods: list[PeriodChoice] = []
        self._scratch = threading.local()

    @property
    def workspace(self) -> Workspace:
        """Scoring scratch of the calling thread (the request's, or the server's look-ahead thread),
        reused layer after layer."""
        held = getattr(self._scratch, "workspace", None)
        if held is None:
            held = self._scratch.workspace = Workspace()
        return held

    async def start_load_kv(self) -> None:
        stats = self.loader.start_blob("stats", [0], priority=STATS_PRIORITY)
        for s in self.starts:
            self._ident[s] = self._request_ident(s)
        if self.params.evaluate_recall:
            for layer in range(self.chunks.num_layers):
                self._eval[layer] = self.loader.start_blob(f"idkeys/L{layer}", range(self.chunks.num_chunks),
                                                           priority=2 * layer - 1, category="eval")
        importance = self.codec.importance((await asyncio.wrap_future(stats))[0], device="cpu")  # host decision
        self._predict(0, select_top(importance.sum(dim=0), self.budget))

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        self._layer = layer

    def _request_ident(self, layer: int) -> Future[Records]:
        """Layer ``layer``'s identification data, whole: resident in the server's cache, or read."""
        region = f"{self.ident_region}/L{layer}"
        cache, prefix, layout = self.context.ident_cache, self.context.prefix_id, self.codec.name
        if cache is not None and (records := cache.get(prefix, layout, region)) is not None:
            self._ident_cached += sum(len(r) for r in records)
            done: Future[Records] = Future()
            done.set_result(list(records))  # type: ignore[arg-type]
            return done
        indices = range(self.chunks.num_chunks) if self.ident_region == "idkeys" else [0]
        future = self.loader.start_blob(region, indices, priority=2 * layer - 1, category="ident")
        self._ident_read[layer] = self.chunks.ident_record_size(self.ident_region)
        if cache is not None:
            def keep(f: Future[Records]) -> None:
                if not f.cancelled() and f.exception() is None:
                    cache.put(prefix, layout, region, tuple(bytes(r) for r in f.result()))
            future.add_done_callback(keep)
        return future

    def _predict(self, start: int, chunks: list[int]) -> None:
        tags: dict[int, list[int]] = {}
        for run in self._runs[start]:
            for chunk, run_tags in self.loader.start_load_per_unit(chunks, run, priority=2 * run.start).items():
                tags.setdefault(chunk, []).extend(run_tags)
        self._predicted[start] = tags

    def _commit(self, start: int, chunks: list[int], scores: torch.Tensor) -> None:
        """Period ``start`` attends to ``chunks``: fetch what was not predicted, cancel the rest, and
        ship ``chunks`` as the following period's prediction unless one is out already."""
        predicted = self._predicted.pop(start, {})
        chosen = set(chunks)
        missing = sorted(chosen - set(predicted))
        if missing:
            for run in self._runs[start]:
                self.loader.start_load(missing, run, priority=2 * run.start)
        self.loader.cancel([t for c, tags in predicted.items() if c not in chosen for t in tags])
        self._selected[start] = chunks
        index = self.starts.index(start)
        period = self.params.period
        self.loader.expect(range(start, min(start + period, self.chunks.num_layers)), chunks)
        layers = min(period, self.chunks.num_layers - start)
        self.periods.append(PeriodChoice(index, start, layers, chunks, len(predicted),
                                         len(chosen & set(predicted)), scores=scores))
        self.periods.sort(key=lambda p: p.first_layer)
        following = self.starts[index + 1] if index + 1 < len(self.starts) else None
        if (following is not None and following not in self._selected and following not in self._predicted
                and not self._speculates(following)):
            self._predict(following, chunks)

    def _speculates(self, start: int) -> bool:
        """Whether period ``start``'s prediction will come from speculative scoring (then no
        prediction ships at the previous commit)."""
        return False

    def _wait_blob(self, future: Future[Records]) -> Records:
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()  # resident or already in: no wait to charge
        records, waited = self.loader.wait_blob(future)
        self._blocked_s += waited
        self._pending_wait += waited
        self._ident_wait[self._layer] += waited
        return records

    def _layer_keys(self, future: Future[Records]) -> torch.Tensor:
        """All prefix keys of a layer, [kv_heads, n, d] in the scoring dtype, from its idkeys records
        (on the CPU in the policy's scratch: valid until the next call)."""
        return self.codec.layer_keys(self._wait_blob(future), device=self.projector.device, scratch=self.workspace,
                                     dtype=self.context.score_dtype)

    def _exact_scores(self, q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This policy's rule (:attr:`score_heads`) over exact (or dequantised) keys."""
        return exact_chunk_scores(self.chunks, q, k, keys, self.projector.scaling, self.workspace,
                                  dtype, self.score_heads)

    @property
    def score_heads(self) -> str:
        """How this policy combines the query heads' mass on a chunk (``sum`` or ``max``)."""
        return self.context.score_heads if self.follows_score_rule else "sum"

    @property
    def score_window(self) -> int:
        """The query's last this many tokens score chunks (0: every token)."""
        return self.context.score_window if self.follows_score_rule else 0

    def _evaluate(self, layer: int, q: torch.Tensor, k: torch.Tensor, chunks: list[int]) -> None:
        """evaluate_recall: set and mass recall of ``chunks`` against the exact top-k at ``layer``
        (by this policy's rule, from every key in float32)."""
        records, _ = self.loader.wait_blob(self._eval.pop(layer))  # evaluation reads are not charged
        keys = self.codec.layer_keys(records, device=self.projector.device)
        exact = self._exact_scores(query_window(q, self.score_window), k, keys)
        top = select_top(exact, self.budget)
        mass = float(exact[top].sum())
        self._recalls[layer] = (len(set(top) & set(chunks)) / len(top),
                                float(exact[chunks].sum()) / mass if mass > 0 else 1.0)

    def _choose(self, start: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Score period ``start`` from the query's q (its :attr:`score_window`) and k there and
        commit its chunk set."""
        scores = self._score(start, query_window(q, self.score_window), k)
        chunks = select_top(scores, self.budget)  # synchronises: the scores are ready to copy
        self._commit(start, chunks, scores.cpu())  # host copy for the report (event loop)

    @abc.abstractmethod
    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Chunk scores [m] for the period starting at ``start`` from the query's q and k there."""

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        self._layer = layer
        start = layer - layer % self.params.period
        if start not in self._selected:
            with self.selecting():
                self._choose(start, q, k)
        if layer in self._eval:
            self._evaluate(layer, q, k, self._selected[start])
        keys, values, waited = self.loader.wait_for_layer(layer, self._selected[start])
        self.loader.release_layer(layer)
        waited, self._pending_wait = waited + self._pending_wait, 0.0
        return keys, values, waited

    def chunks_at(self, layer: int) -> list[int]:
        """Chunks the layer attended to (after the request finished)."""
        return self._selected[layer - layer % self.params.period]

    @property
    def prediction_hit_rate(self) -> float:
        predicted = sum(p.predicted for p in self.periods)
        return sum(p.predicted_hits for p in self.periods) / predicted if predicted else 1.0

    def usage(self) -> LoadUsage:
        for p in self.periods:  # a period's recall: the mean over its evaluated layers
            got = [self._recalls[l] for l in range(p.first_layer, p.first_layer + p.num_layers) if l in self._recalls]
            if got:
                p.recall = sum(r for r, _ in got) / len(got)
                p.mass_recall = sum(m for _, m in got) / len(got)
        return chunk_usage(self.loader, self.chunks, self.chunks_at, self.periods, self._ident_read,
                           self.prediction_hit_rate, [self._recalls[l] for l in sorted(self._recalls)],
                           self._ident_wait, self._ident_cached)

    def attention_report(self) -> list[RegionScores]:
        return attention_report(self.chunks, self.periods)
