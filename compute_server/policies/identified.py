"""Per-layer chunk selection from compact identification data: `contiguous+`, `contiguous+quest`, `oracle`.

Each layer (``default_period`` 1) is scored from that layer's identification record, read whole
and early: every layer's record is requested before layer 0 at a priority just ahead of that
layer's K/V (or found resident in the server's identification cache, and then not read at all).

Speculate, then correct. Before layer ``l`` runs, the hidden state entering ``l`` is projected with
layer ``l + 1``'s weights and scored against ``l + 1``'s identification data; the chosen chunks are
shipped at once, so their reads overlap layer ``l``'s compute (InfiniGen's observation: adjacent
layers' inputs are similar). When layer ``l + 1`` starts, its real query rescores the same data
(already decoded: no I/O), the chunks the speculation missed are requested, and those it picked
wrongly are cancelled. On the real Qwen model the correction is what keeps the answers: choosing
from the speculative scores alone loses some (docs/selection.md). Layer 0's prediction is the stored
static importance; its real query corrects it the same way.

The speculation (decoding ``l + 1``'s data, projecting, scoring, shipping) runs on the server's
look-ahead thread when it has one (``PolicyContext.ahead``), beside the request's thread running
layer ``l``; the request joins it at ``l + 1`` and runs it itself if the thread has not begun it,
so the same chunks ship either way (docs/performance.md).

What each policy scores with (fractions of the prefix's K+V bytes in bf16; docs/selection.md):

- `contiguous+` — ``qkeys``: the keys at 2 bits with per-channel float16 (min, step) over 64-token
  groups (7.8 %), dequantised and scored exactly like the full keys.
- `contiguous+1bit` — ``qkeys1``: 1 bit per value over 128-token groups, levels fitted by least
  squares (3.9 %).
- `contiguous+quest` — ``minmax``: Quest's per-chunk min and max key (6.3 %), scored by the
  upper bound of q.k.
- `oracle` — ``idkeys``: every key of every layer (50 %), scored with the real query only (no
  speculation): the exact per-layer top-k, the ceiling the others are measured against.
"""

from __future__ import annotations

import abc
from concurrent.futures import Future, wait
from typing import ClassVar, TypeAlias

import torch

from contiguouskv.compute_server.engine import Engine, QueryJob, QueryOutcome
from contiguouskv.compute_server.kvio.loader import Records
from contiguouskv.compute_server.policies.base import PolicyContext
from contiguouskv.compute_server.policies.periodic import PeriodicPolicy
from contiguouskv.compute_server.selection.chunks import (
    packed_chunk_scores, quest_chunk_scores, score_tile_tokens, select_top,
)
from contiguouskv.compute_server.selection.keyquant import PackedKeys

IdentData: TypeAlias = torch.Tensor | PackedKeys
"""A layer's identification data as a policy scores it: keys, min/max bounds, or packed 2-bit keys."""


class IdentifiedPolicy(PeriodicPolicy):
    """Per-layer selection from one identification record per layer; see the module docstring."""

    default_period = 1
    follows_score_rule = True
    speculate: ClassVar[bool] = True
    """Ship layer ``l + 1``'s chunks from the hidden state entering ``l`` (then correct at ``l + 1``)."""
    SPECULATE_TOKENS: ClassVar[int] = 16
    """The speculation scores with the query's last this many tokens only (fewer if the server's
    ``score_window`` is smaller). It only decides what is read early: the real query (its
    ``score_window``) then makes the selection, so the answer does not depend on it, while its
    cost (a pass over all of a layer's identification keys per query token) sat on the request's
    critical path every layer (docs/performance.md)."""

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self._decoded: dict[int, IdentData] = {}
        self._ahead: dict[int, tuple[Future[None], torch.Tensor, torch.Tensor]] = {}  # start -> (task, its input)

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        super().before_layer(layer, hidden, positions)
        start = layer + 1
        if (self._speculates(start) and start < self.chunks.num_layers and start % self.params.period == 0
                and start not in self._selected and start not in self._predicted and start not in self._ahead):
            rows = min(self.SPECULATE_TOKENS, self.score_window or self.SPECULATE_TOKENS)
            tail = slice(max(0, hidden.shape[0] - rows), None)
            ahead = self.context.ahead
            if ahead is None or not ahead.has_threads:
                with self.selecting():
                    if ahead is None:
                        self._speculate(start, hidden[tail], positions[tail], aside=False)
                    else:
                        ahead.run_here(self._speculate, start, hidden[tail], positions[tail], aside=False)
                return
            entering, at = hidden[tail].clone(), positions[tail].clone()  # the engine may reuse its buffers
            task = ahead.submit(self._speculate, start, entering, at, aside=True)
            self._ahead[start] = (task, entering, at)

    def _speculate(self, start: int, hidden: torch.Tensor, positions: torch.Tensor, aside: bool) -> None:
        """Score layer ``start`` from the hidden state entering the layer before it and ship the top
        chunks. ``aside``: on the server's look-ahead thread, while the request's thread runs the
        layer before: the identification data is decoded here too, and its wait is not the
        request's (the request waits only if it reaches ``start`` before this is done)."""
        if aside:
            self._ident_data(start, charge=False)
        q, k, _ = self.projector.project(start, hidden, positions, aside=aside)
        self._predict(start, select_top(self._score(start, q, k), self.budget))

    def _join(self, start: int) -> None:
        """Layer ``start``'s look-ahead is done (waited for; run here if the look-ahead thread has
        not begun it, so the same prediction ships whatever the thread's backlog)."""
        entry = self._ahead.pop(start, None)
        if entry is None:
            return
        task, entering, at = entry
        if task.cancel():
            assert self.context.ahead is not None  # a task was submitted to it
            self.context.ahead.run_here(self._speculate, start, entering, at, aside=False)
        else:
            task.result()  # re-raises what it raised (a cancelled request's wait, a stream error)

    def compute(self, engine: Engine, job: QueryJob) -> QueryOutcome:
        try:
            return super().compute(engine, job)
        finally:  # a request that failed mid-way leaves no look-ahead running on its loader
            for task, _, _ in self._ahead.values():
                task.cancel()
            wait([task for task, _, _ in self._ahead.values()])
            self._ahead.clear()

    def _speculates(self, start: int) -> bool:
        return self.speculate and start > 0

    def _ident_data(self, start: int, charge: bool = True) -> IdentData:
        """Layer ``start``'s identification data on the compute device, decoded once. ``charge``:
        a wait for its record is the request's (its thread is the one waiting)."""
        if start not in self._decoded:
            future = self._ident.pop(start)
            records = self._wait_blob(future) if charge else self.loader.wait_blob(future)[0]
            self._decoded[start] = self._decode(start, records)
        return self._decoded[start]

    def _choose(self, start: int, q: torch.Tensor, k: torch.Tensor) -> None:
        self._join(start)
        super()._choose(start, q, k)
        self._done_with(start)  # scored for good: free it

    def _done_with(self, start: int) -> None:
        """Layer ``start``'s decoded identification data is no longer needed."""
        self._decoded.pop(start, None)

    @abc.abstractmethod
    def _decode(self, start: int, records: Records) -> IdentData:
        """Layer ``start``'s identification records -> what :meth:`_score` scores with, on the compute device."""


class ContiguousPlusPolicy(IdentifiedPolicy):
    """2-bit keys per layer, speculated a layer early and corrected with the real query.

    A layer's record is kept packed and decoded by the scorer one cache-sized tile at a time, for
    the speculation and again for the correction: writing the decoded layer out whole and reading
    it back cost more than decoding it twice (docs/performance.md).
    """

    name = "contiguous+"
    ident_region = "qkeys"

    def _decode(self, start: int, records: Records) -> PackedKeys:
        return self.codec.packed_qkeys(records[0], device=self.projector.device, kind=self.ident_region)

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        device = self.projector.device
        keys = self._ident_data(start)
        assert isinstance(keys, PackedKeys)
        return packed_chunk_scores(self.chunks, q, k, keys, self.projector.scaling, self.workspace,
                                   self.context.score_dtype, self.score_heads, score_tile_tokens(device))


class OneBitPolicy(ContiguousPlusPolicy):
    """`contiguous+` from 1-bit keys (128-token groups, least-squares levels): half the identification bytes."""

    name = "contiguous+1bit"
    ident_region = "qkeys1"


class QuestPolicy(IdentifiedPolicy):
    """Quest's per-chunk min/max keys per layer, speculated and corrected like `contiguous+`."""

    name = "contiguous+quest"
    ident_region = "minmax"

    def _decode(self, start: int, records: Records) -> torch.Tensor:
        return self.codec.minmax(records[0], device=self.projector.device)

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        bounds = self._ident_data(start)
        assert isinstance(bounds, torch.Tensor)
        return quest_chunk_scores(self.chunks, q, k, bounds, self.projector.scaling, self.score_heads)


class OraclePolicy(IdentifiedPolicy):
    """Exact per-layer top-k from all of the layer's keys with the real query: the quality ceiling."""

    name = "oracle"
    ident_region = "idkeys"
    speculate = False

    def _decode(self, start: int, records: Records) -> torch.Tensor:
        return self.codec.layer_keys(records, device=self.projector.device)

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """In float32 whatever ``score_dtype`` says: the ceiling the others are measured against."""
        keys = self._ident_data(start)
        assert isinstance(keys, torch.Tensor)
        return self._exact_scores(q, k, keys)
