"""`contiguous+digest`: the first `contiguous+` — digest shortlist, exact rescoring, one layer early.

Kept as a measured alternative (docs/selection.md). Every period's first layer is scored from
stored per-chunk mean-key digests; the top ``SHORTLIST`` x k chunks by digest are then rescored
exactly from their identification keys (only those chunks' key records are read) and the top k
kept. At the layer before a period the hidden state entering that layer, projected with the
period's first layer, does the scoring, so the period's indices ship a whole layer before they are
needed. Period 0 is scored at layer 0 from the embeddings, which is exact. With one layer per
period, speculation replaces the shipped-ahead prediction, so none is sent. The shortlist's keys
are read while the layer waits: that wait is what made this policy's identification exposed.
"""

from __future__ import annotations

import torch

from contiguouskv.compute_server.policies.periodic import PeriodicPolicy
from contiguouskv.compute_server.selection.chunks import digest_chunk_scores, select_top, shortlist_chunk_scores


class DigestShortlistPolicy(PeriodicPolicy):
    """Per-layer selection (``default_period`` 1) from digests plus an exact shortlist rescoring."""

    name = "contiguous+digest"
    ident_region = "digest"
    default_period = 1
    SHORTLIST = 3

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        super().before_layer(layer, hidden, positions)
        start = layer + 1
        if start in self._ident and start not in self._selected and start % self.params.period == 0:
            with self.selecting():
                q, k, _ = self.projector.project(start, hidden, positions)
                self._choose(start, q, k)

    def _predict(self, start: int, chunks: list[int]) -> None:
        if self.params.period > 1 or start == 0:  # the prior for period 0 always ships before layer 0
            super()._predict(start, chunks)

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        lay = self.chunks
        digest = self.codec.digest(self._wait_blob(self._ident.pop(start))[0], device=self.projector.device)
        rough = digest_chunk_scores(lay, q, k, digest, self.projector.scaling)
        # 3k chunks, but never more than half the prefix unless the budget itself is larger
        shortlist = select_top(rough, max(self.budget, min(0.5, self.SHORTLIST * self.budget)))
        if len(shortlist) >= lay.num_chunks:
            return rough if len(shortlist) == 0 else self._rescore(start, q, k, digest, list(range(lay.num_chunks)))
        return self._rescore(start, q, k, digest, shortlist)

    def _rescore(self, start: int, q: torch.Tensor, k: torch.Tensor, digest: torch.Tensor,
                 shortlist: list[int]) -> torch.Tensor:
        """Exact mass for shortlisted chunks (their keys read now); the rest keep digest scores."""
        future = self.loader.start_blob(f"idkeys/L{start}", shortlist, priority=2 * start - 1, category="ident")
        self._ident_read[start] += len(shortlist) * self.chunks.token_bytes
        keys = self.codec.chunk_keys(self._wait_blob(future), device=self.projector.device)  # [kv_heads, |sl| * c, d]
        return shortlist_chunk_scores(self.chunks, q, k, digest, shortlist, keys, self.projector.scaling)
