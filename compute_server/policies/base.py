"""Selection policies: which prefix KV a Re-Prefill loads, behind one small interface.

A policy ships its first requests on the event loop (:meth:`Policy.start`), then, on the compute
thread, sees the hidden state entering each layer (:meth:`Policy.before_layer`) and serves each
layer's prefix K/V (:meth:`Policy.kv_for_layer`), blocking only for that layer's records.
``recompute`` loads no KV and is handled by the engine's full prefill; it is named here so every
policy name resolves in one place.

Periodic policies (`contiguous`, `contiguous+`) share one chunk set per period of ``p`` layers,
fetched in sub-periods of ``sp`` layers. Before layer 0 they ship a prediction for period 0 (the
prior: static importance stored at registration). When period k's set S_k is known they request
only S_k minus the prediction, cancel the predicted chunks not in S_k, and ship S_k as the
prediction for period k+1. Predictions go out one request per chunk so each can be cancelled alone.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field

import torch

from contiguouskv.compute_server.layouts.impress import ImpressLayout
from contiguouskv.compute_server.layouts.contiguous import sub_periods
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.layouts.packing import TORCH_DTYPES, frombuffer, unpack_importance
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.selection.chunks import (
    digest_chunk_scores, exact_chunk_scores, select_top, shortlist_chunk_scores,
)

POLICY_NAMES = ("recompute", "full", "contiguous", "contiguous+", "h2o", "impress")
TOKEN_POLICY_NAMES = ("h2o", "impress")
"""Token-level baselines: they read the `impress` layout (64-token K/V blocks), see :mod:`impress`."""
STATS_PRIORITY = -(1 << 20)


@dataclass
class PeriodSelection:
    """What one period selected and how well its prediction did."""

    period: int
    first_layer: int
    num_layers: int
    chunks: list[int]
    predicted: int = 0
    predicted_hits: int = 0
    recall: float = -1.0
    scores: torch.Tensor | None = field(default=None, repr=False)


class Policy(abc.ABC):
    """Chooses and requests prefix KV for one request."""

    name: str = ""

    def __init__(self, loader: KVLoader, runner: ModelRunner, budget: float, period: int, sub_period: int,
                 evaluate_recall: bool = False) -> None:
        self.loader = loader
        self.layout = loader.layout
        self.runner = runner
        self.budget = budget
        self.period = period
        self.sub_period = sub_period
        self.evaluate_recall = evaluate_recall
        self.periods: list[PeriodSelection] = []

    @abc.abstractmethod
    async def start(self) -> None:
        """Called on the event loop before layer 0: ship the first requests."""

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Called on the compute thread with the hidden state entering ``layer``."""

    @abc.abstractmethod
    def kv_for_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Called on the compute thread in layer order; returns prefix K, V and seconds blocked."""

    def chunks_at(self, layer: int) -> list[int]:
        """Chunks the layer attended to (after the request finished)."""
        return list(range(self.layout.num_chunks))

    @property
    def prediction_hit_rate(self) -> float:
        predicted = sum(p.predicted for p in self.periods)
        return sum(p.predicted_hits for p in self.periods) / predicted if predicted else 1.0


class FullPolicy(Policy):
    """Every record, requested sub-period by sub-period, earlier layers first (AttentionStore-like)."""

    name = "full"

    async def start(self) -> None:
        chunks = range(self.layout.num_chunks)
        self.loader.expect(range(self.layout.num_layers), chunks)
        for run in sub_periods(self.layout.num_layers, self.period, self.sub_period):
            self.loader.start_load(chunks, run, priority=2 * run.start)

    def kv_for_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        out = self.loader.wait_for_layer(layer, range(self.layout.num_chunks))
        self.loader.release_layer(layer)
        return out


class PeriodicPolicy(Policy):
    """Shared machinery of the period-based policies; subclasses say how a period is scored."""

    ident_region = "idkeys"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        L = self.layout.num_layers
        self.starts = list(range(0, L, self.period))
        self._runs = {s: [r for r in sub_periods(L, self.period, self.sub_period) if s <= r.start < s + self.period]
                      for s in self.starts}
        self._ident: dict[int, object] = {}
        self._eval: dict[int, object] = {}
        self._predicted: dict[int, dict[int, list[int]]] = {}
        self._selected: dict[int, list[int]] = {}
        self._pending_wait = 0.0

    async def start(self) -> None:
        stats = self.loader.start_blob("stats", [0], priority=STATS_PRIORITY)
        for s in self.starts:
            self._ident[s] = self._request_ident(s)
            if self.evaluate_recall and self.ident_region != "idkeys":
                self._eval[s] = self.loader.start_blob(f"idkeys/L{s}", range(self.layout.num_chunks),
                                                       priority=2 * s - 1, category="eval")
        importance = unpack_importance(self.layout, (await asyncio.wrap_future(stats))[0])  # type: ignore[arg-type]
        self._predict(0, select_top(importance.sum(dim=0), self.budget))

    def _request_ident(self, layer: int) -> object:
        indices = range(self.layout.num_chunks) if self.ident_region == "idkeys" else [0]
        return self.loader.start_blob(f"{self.ident_region}/L{layer}", indices, priority=2 * layer - 1,
                                      category="ident")

    def _predict(self, start: int, chunks: list[int]) -> None:
        tags: dict[int, list[int]] = {}
        for run in self._runs[start]:
            for chunk, run_tags in self.loader.start_load_per_chunk(chunks, run, priority=2 * run.start).items():
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
        self.loader.expect(range(start, min(start + self.period, self.layout.num_layers)), chunks)
        layers = min(self.period, self.layout.num_layers - start)
        self.periods.append(PeriodSelection(index, start, layers, chunks, len(predicted),
                                            len(chosen & set(predicted)), recall, scores))
        self.periods.sort(key=lambda p: p.first_layer)
        following = self.starts[index + 1] if index + 1 < len(self.starts) else None
        if following is not None and following not in self._selected:  # p = 1 may speculate first
            self._predict(following, chunks)

    def _wait_blob(self, future: object) -> list[bytes]:
        records, waited = self.loader.wait_blob(future)  # type: ignore[arg-type]
        self._pending_wait += waited
        return records

    def _idkeys(self, layer: int, future: object) -> torch.Tensor:
        """All prefix keys of a layer, [kv_heads, n, d], from its idkeys records."""
        dtype = TORCH_DTYPES[self.layout.dtype]
        lay = self.layout
        chunks = [frombuffer(r, dtype).view(lay.num_kv_heads, lay.chunk_size, lay.head_dim)
                  for r in self._wait_blob(future)]
        return torch.cat(chunks, dim=1)[:, : lay.num_tokens]  # [kv_heads, n, d]

    def _exact_recall(self, start: int, q: torch.Tensor, k: torch.Tensor, chunks: list[int]) -> float:
        keys = self._idkeys(start, self._eval.pop(start))
        exact = select_top(exact_chunk_scores(self.layout, q, k, keys, self.runner.scaling), self.budget)
        return len(set(exact) & set(chunks)) / len(exact)

    @abc.abstractmethod
    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Chunk scores [m] for the period starting at ``start`` from the query's q and k there."""

    def kv_for_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        start = layer - layer % self.period
        if start not in self._selected:
            scores = self._score(start, q, k)
            chunks = select_top(scores, self.budget)
            recall = self._exact_recall(start, q, k, chunks) if start in self._eval else -1.0
            self._commit(start, chunks, scores, recall)
        keys, values, waited = self.loader.wait_for_layer(layer, self._selected[start])
        self.loader.release_layer(layer)
        waited, self._pending_wait = waited + self._pending_wait, 0.0
        return keys, values, waited

    def chunks_at(self, layer: int) -> list[int]:
        return self._selected[layer - layer % self.period]


class ContiguousPolicy(PeriodicPolicy):
    """The paper's policy: exact scores from all keys of each period's first layer."""

    name = "contiguous"

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keys = self._idkeys(start, self._ident.pop(start))
        return exact_chunk_scores(self.layout, q, k, keys, self.runner.scaling)


class ContiguousPlusPolicy(PeriodicPolicy):
    """Digest shortlist, exact rescoring of the shortlist, scored one layer early (speculatively).

    Every period's first layer is scored from stored per-chunk mean-key digests (about 1/c of the
    layer's keys); the top ``SHORTLIST`` x k chunks by digest are then rescored exactly from their
    identification keys (only those chunks' key records are read) and the top k kept. At the layer
    before a period the hidden state entering that layer, projected with the period's first layer,
    does the scoring, so the period's indices ship a whole layer before they are needed. Period 0 is
    scored at layer 0 from the embeddings, which is exact. With one layer per period, speculation
    replaces the shipped-ahead prediction, so none is sent.
    """

    name = "contiguous+"
    ident_region = "digest"
    SHORTLIST = 3

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        start = layer + 1
        if start in self._ident and start not in self._selected and start % self.period == 0:
            q, k, _ = self.runner.project(start, hidden, positions)
            scores = self._score(start, q, k)
            chunks = select_top(scores, self.budget)
            recall = self._exact_recall(start, q, k, chunks) if start in self._eval else -1.0
            self._commit(start, chunks, scores, recall)

    def _predict(self, start: int, chunks: list[int]) -> None:
        if self.period > 1 or start == 0:  # the prior for period 0 always ships before layer 0
            super()._predict(start, chunks)

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        record = self._wait_blob(self._ident.pop(start))[0]
        lay = self.layout
        digest = frombuffer(record, torch.float32).view(lay.num_chunks, lay.num_kv_heads, lay.head_dim)
        rough = digest_chunk_scores(lay, q, k, digest, self.runner.scaling)
        # 3k chunks, but never more than half the prefix unless the budget itself is larger
        shortlist = select_top(rough, max(self.budget, min(0.5, self.SHORTLIST * self.budget)))
        if len(shortlist) >= lay.num_chunks:
            return rough if len(shortlist) == 0 else self._rescore(start, q, k, digest, list(range(lay.num_chunks)))
        return self._rescore(start, q, k, digest, shortlist)

    def _rescore(self, start: int, q: torch.Tensor, k: torch.Tensor, digest: torch.Tensor,
                 shortlist: list[int]) -> torch.Tensor:
        """Exact mass for shortlisted chunks (their keys read now); the rest keep digest scores."""
        lay = self.layout
        future = self.loader.start_blob(f"idkeys/L{start}", shortlist, priority=2 * start - 1, category="ident")
        dtype = TORCH_DTYPES[lay.dtype]
        keys = torch.cat([frombuffer(r, dtype).view(lay.num_kv_heads, lay.chunk_size, lay.head_dim)
                          for r in self._wait_blob(future)], dim=1)  # [kv_heads, |shortlist| * c, d]
        return shortlist_chunk_scores(lay, q, k, digest, shortlist, keys, self.runner.scaling)


def make_policy(name: str, loader: KVLoader, runner: ModelRunner, budget: float, period: int, sub_period: int,
                evaluate_recall: bool = False, blocks: ImpressLayout | None = None) -> Policy:
    """The policy named ``name`` (one of :data:`POLICY_NAMES` that loads KV).

    The token-level policies (:data:`TOKEN_POLICY_NAMES`) need ``blocks``, the prefix's `impress`
    layout, and ``loader`` reading from it.
    """
    if name in TOKEN_POLICY_NAMES:
        from contiguouskv.compute_server.policies.h2o import H2OPolicy  # they build on Policy: import late
        from contiguouskv.compute_server.policies.impress import ImpressPolicy

        if blocks is None:
            raise ValueError(f"policy {name!r} needs the prefix's impress layout")
        token_classes: dict[str, type[Policy]] = {"h2o": H2OPolicy, "impress": ImpressPolicy}
        return token_classes[name](loader, runner, budget, period, sub_period, evaluate_recall,
                                   blocks=blocks)  # type: ignore[call-arg]
    classes: dict[str, type[Policy]] = {"full": FullPolicy, "contiguous": ContiguousPolicy,
                                        "contiguous+": ContiguousPlusPolicy}
    if name not in classes:
        raise ValueError(f"policy {name!r} loads no KV or is unknown; known: {POLICY_NAMES}")
    return classes[name](loader, runner, budget, period, sub_period, evaluate_recall)
