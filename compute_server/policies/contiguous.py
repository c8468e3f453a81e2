"""`contiguous`: the paper's ContiguousKV — exact scores from all keys of each period's first layer."""

from __future__ import annotations

import torch

from contiguouskv.compute_server.policies.periodic import PeriodicPolicy
from contiguouskv.compute_server.selection.chunks import exact_chunk_scores


class ContiguousPolicy(PeriodicPolicy):
    """Scores a period from every prefix key of its first layer (the ``idkeys`` region)."""

    name = "contiguous"

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keys = self._layer_keys(self._ident.pop(start))
        return exact_chunk_scores(self.chunks, q, k, keys, self.projector.scaling, self.workspace,
                                  self.context.score_dtype)
