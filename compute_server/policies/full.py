"""`full`: every K/V record, requested sub-period by sub-period, earlier layers first (AttentionStore-like)."""

from __future__ import annotations

import torch

from contiguouskv.compute_server.layouts.contiguous import sub_periods
from contiguouskv.compute_server.policies.base import LoadingPolicy


class FullPolicy(LoadingPolicy):
    """Loads everything; each layer waits only for its own records."""

    name = "full"
    selective = False

    async def start_load_kv(self) -> None:
        lay, p = self.chunks, self.params
        chunks = range(lay.num_chunks)
        self.loader.expect(range(lay.num_layers), chunks)
        for run in sub_periods(lay.num_layers, p.period, p.sub_period):
            self.loader.start_load(chunks, run, priority=2 * run.start)

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        out = self.loader.wait_for_layer(layer, range(self.chunks.num_chunks))
        self.loader.release_layer(layer)
        return out
