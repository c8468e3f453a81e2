"""A loading policy that lives outside the server: loaded with ``--policy-plugin plugin_policies:RecentChunksPolicy``.

It is the worked example of docs/architecture.md: the attention-sink chunk plus the most recent
chunks (StreamingLLM-like), chosen before layer 0 and requested at once. Nothing in the compute
server names it.
"""

from __future__ import annotations

import torch

from contiguouskv.compute_server.policies.base import LoadingPolicy, LoadUsage, chunk_usage
from contiguouskv.compute_server.selection.chunks import budget_chunks


class RecentChunksPolicy(LoadingPolicy):
    """The first chunk and the last ``k - 1`` chunks at every layer, ``k = ceil(budget x m)``."""

    name = "recent"

    async def start_load_kv(self) -> None:
        m = self.chunks.num_chunks
        k = budget_chunks(self.budget, m)
        self.chosen = sorted({0, *range(m - (k - 1), m)})
        every = range(self.chunks.num_layers)
        self.loader.expect(every, self.chosen)  # staged off the compute thread as records arrive
        self.loader.start_load(self.chosen, every)

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        keys, values, waited = self.loader.wait_for_layer(layer, self.chosen)
        self.loader.release_layer(layer)
        return keys, values, waited

    def usage(self) -> LoadUsage:
        return chunk_usage(self.loader, self.chunks, lambda layer: self.chosen)


class NotAPolicy:
    """For the test that a plugin must be a LoadingPolicy."""
