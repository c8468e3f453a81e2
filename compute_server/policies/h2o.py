"""The `h2o` baseline: token-level, query-independent selection served from 64-token K/V blocks.

ContiguousKV compares against AttentionStore plus H2O pruning (AS+H2O+LFU/LRU, PAPER_NOTES A7) with
64-token blocks. H2O ranks tokens by accumulated attention (column sums of the softmax matrix).
Here that importance is computed once, at registration, from the last ``w`` prefix queries
(:func:`scoring.window_token_importance`), and stored per layer in the `impress` layout's ``h2o``
region. Because it does not depend on the query, the whole selection is known before layer 0: every
layer keeps its own top ``ceil(budget x n)`` tokens, shared by all heads, and the K and V blocks
holding them are requested at once, earlier layers first, so loading is layer-pipelined
(AttentionStore-like). Each layer then waits only for its own blocks.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import torch

from contiguouskv.compute_server.engine import PrefixKV
from contiguouskv.compute_server.policies.impress import TokenPolicy, top_tokens
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.layouts.packing import unpack_blocks, unpack_token_importance
from contiguouskv.compute_server.policies.base import STATS_PRIORITY
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.selection.importance import window_importance, window_token_importance


def prefill_with_token_importance(runner: ModelRunner, token_ids: list[int], layout: ContiguousLayout,
                                  block_size: int, window: int) -> tuple[PrefixKV, torch.Tensor]:
    """Like :meth:`Engine.prefill_prefix` (same K/V and chunk importance), plus the static token
    importance of every layer, float32 [L, n], for the `impress` layout's ``h2o`` region."""
    w = min(window, len(token_ids))
    result = runner.prefill(torch.tensor(token_ids), block_size=block_size, keep_last_queries=w)
    scale = runner.scaling
    chunks = torch.stack([window_importance(layout, q, k, scale) for q, k in zip(result.last_queries, result.keys)])
    tokens = torch.stack([window_token_importance(q, k, scale) for q, k in zip(result.last_queries, result.keys)])
    kv = PrefixKV([k.cpu() for k in result.keys], [v.cpu() for v in result.values], chunks)
    return kv, tokens


class H2OPolicy(TokenPolicy):
    """Per layer, the top tokens by stored importance; all layers' blocks requested before layer 0."""

    name = "h2o"

    async def start(self) -> None:
        lay = self.blocks
        layers = list(range(lay.num_layers))
        records = await asyncio.wrap_future(self._request(lay.importance_region, layers, "ident", STATS_PRIORITY))
        scores = unpack_token_importance(lay, records)  # [L, n]
        self._futures: dict[int, tuple[Future[list[bytes]], Future[list[bytes]]]] = {}
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

    def kv_for_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        lay, sel = self.blocks, self.selections[layer]
        fk, fv = self._futures.pop(layer)
        k_records, wk = self._wait(fk)
        v_records, wv = self._wait(fv)
        positions = self._positions(sel.blocks, sel.tokens)  # [kv_heads, k]
        keys = self._take(unpack_blocks(lay, k_records, lay.num_kv_heads), positions)
        values = self._take(unpack_blocks(lay, v_records, lay.num_kv_heads), positions)
        return keys, values, wk + wv
