"""The `h2o` baseline: token-level, query-independent selection served from 64-token K/V blocks.

ContiguousKV compares against AttentionStore plus H2O pruning with 64-token blocks
(docs/baselines.md). H2O ranks tokens by accumulated attention (column sums of the softmax matrix).
Here that importance is computed once, at registration, from the last ``w`` prefix queries
(:func:`~..selection.importance.window_token_importance`), and stored per layer in the `impress`
layout's ``h2o`` region. Because it does not depend on the query, the whole selection is known
before layer 0: every layer keeps its own top ``ceil(budget x n)`` tokens, shared by all heads, and
the K and V blocks holding them are requested at once, earlier layers first, so loading is
layer-pipelined (AttentionStore-like). Each layer then waits only for its own blocks.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import torch

from contiguouskv.compute_server.kvio.loader import Records
from contiguouskv.compute_server.policies.base import STATS_PRIORITY
from contiguouskv.compute_server.policies.token_level import TokenPolicy
from contiguouskv.compute_server.selection.tokens import top_tokens


class H2OPolicy(TokenPolicy):
    """Per layer, the top tokens by stored importance; all layers' blocks requested before layer 0."""

    name = "h2o"

    async def start_load_kv(self) -> None:
        lay = self.blocks
        layers = list(range(lay.num_layers))
        records = await asyncio.wrap_future(self._request(lay.importance_region, layers, "ident", STATS_PRIORITY))
        scores = self.codec.token_importance(records)  # [L, n]
        self._futures: dict[int, tuple[Future[Records], Future[Records]]] = {}
        for layer in layers:
            tokens = top_tokens(scores[layer : layer + 1], self.k)  # [1, k]
            sel = self._selection(layer, tokens.expand(lay.num_kv_heads, -1), shared=True)
            sel.scores = scores[layer].clone()
            sel.bytes_identification = lay.importance_record_size
            sel.bytes_kv = 2 * len(sel.blocks) * lay.block_record_size
            sel.fetched_blocks = {lay.k_region(layer): sel.blocks, lay.v_region(layer): sel.blocks}
            self._futures[layer] = (self._request(lay.k_region(layer), sel.blocks, "kv", 2 * layer),
                                    self._request(lay.v_region(layer), sel.blocks, "kv", 2 * layer))
            self.selections.append(sel)

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        sel = self.selections[layer]
        fk, fv = self._futures.pop(layer)
        k_records, wk = self._wait(fk)
        v_records, wv = self._wait(fv)
        positions = self._positions(sel.blocks, sel.tokens)  # [kv_heads, k]
        keys = self._take(self.codec.blocks(k_records), positions)
        values = self._take(self.codec.blocks(v_records), positions)
        return keys, values, wk + wv
