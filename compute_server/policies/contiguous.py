"""`contiguous`: the paper's ContiguousKV — exact scores from all keys of each period's first layer."""

from __future__ import annotations

import torch

from contiguouskv.compute_server.policies.periodic import PeriodicPolicy


class ContiguousPolicy(PeriodicPolicy):
    """Scores a period from every prefix key of its first layer (the ``idkeys`` region)."""

    name = "contiguous"

    def _score(self, start: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self._exact_scores(q, k, self._layer_keys(self._ident.pop(start)), self.context.score_dtype)
