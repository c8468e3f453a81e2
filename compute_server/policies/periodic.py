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
from contiguouskv.compute_server.selection.chunks import exact_chunk_scores, select_top


class PeriodicPolicy(LoadingPolicy):
    """One chunk set per period, predicted ahead; see the module docstring."""

    ident_region: ClassVar[str] = "idkeys"
    """The region read to score a period's first layer: ``idkeys`` (every key) or ``digest``."""

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
        self.periods: list[PeriodChoice] = []

    async def start_load_kv(self) -> None:
        stats = self.loader.start_blob("stats", [0], priority=STATS_PRIORITY)
        for s in self.starts:
            self._ident[s] = self._request_ident(s)
            if self.params.evaluate_recall and self.ident_region != "idkeys":
                self._eval[s] = self.loader.start_blob(f"idkeys/L{s}", range(self.chunks.num_chunks),
                                                       priority=2 * s - 1, category="eval")
        importance = self.codec.importance((await asyncio.wrap_future(stats))[0], device="cpu")  # host decision
        self._predict(0, select_top(importance.sum(dim=0), self.budget))

    def _request_ident(self, layer: int) -> Future[Records]:
        indices = range(self.chunks.num_chunks) if self.ident_region == "idkeys" else [0]
        return self.loader.start_blob(f"{self.ident_region}/L{layer}", indices, priority=2 * layer - 1,
                                      category="ident")

    def _predict(self, start: int, chunks: list[int]) -> None:
        tags: dict[int, list[int]] = {}
        for run in self._runs[start]:
            for chunk, run_tags in self.loader.start_load_per_unit(chunks, run, priority=2 * run.start).items():
                tags.setdefault(chunk, []).extend(run_tags)
        self._predicted[start] = tags

    def _commit(self, start: int, chunks: list[int], scores: torch.Tensor, recall: float = -1.0) -> None:
        """Period ``start`` attends to ``chunks``: fetch what was not predicted, cancel the rest."""
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
                                         len(chosen & set(predicted)), recall, scores))
        self.periods.sort(key=lambda p: p.first_layer)
        following = self.starts[index + 1] if index + 1 < len(self.starts) else None
        if following is not None and following not in self._selected:  # p = 1 may speculate first
            self._predict(following, chunks)

    def _wait_blob(self, future: Future[Records]) -> Records:
        records, waited = self.loader.wait_blob(future)
        self._pending_wait += waited
        return records

    def _layer_keys(self, future: Future[Records]) -> torch.Tensor:
        """All prefix keys of a layer, [kv_heads, n, d], from its idkeys records."""
        return self.codec.layer_keys(self._wait_blob(future), device=self.projector.device)

    def _exact_recall(self, start: int, q: torch.Tensor, k: torch.Tensor, chunks: list[int]) -> float:
        keys = self._layer_keys(self._eval.pop(start))
        exact = select_top(exact_chunk_scores(self.chunks, q, k, keys, self.projector.scaling), self.budget)
        return len(set(exact) & set(chunks)) / len(exact)

    def _choose(self, start: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Score period ``start`` from the query's q and k there and commit its chunk set."""
        scores = self._score(start, q, k)
        chunks = select_top(scores, self.budget)  # synchronises: the scores are ready to copy
        recall = self._exact_recall(start, q, k, chunks) if start in self._eval else -1.0
        self._commit(start, chunks, scores.cpu(), recall)  # host copy for the report (event loop)

    @abc.abstractmethod
    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Chunk scores [m] for the period starting at ``start`` from the query's q and k there."""

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        start = layer - layer % self.params.period
        if start not in self._selected:
            self._choose(start, q, k)
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
        lay = self.chunks
        size = lay.num_chunks * lay.token_bytes if self.ident_region == "idkeys" else lay.digest_record_size
        ident = [0] * lay.num_layers
        for start in self.starts:
            ident[start] = size
        return chunk_usage(self.loader, lay, self.chunks_at, self.periods, ident, self.prediction_hit_rate)

    def attention_report(self) -> list[RegionScores]:
        return attention_report(self.chunks, self.periods)
