"""The `h2o` baseline: token-level, query-independent selection served from 64-token K/V blocks.

ContiguousKV compares against AttentionStore plus H2O pruning with 64-token blocks
(docs/baselines.md). H2O ranks tokens by accumulated attention (column sums of the softmax matrix).
Here that importance is computed once, at registration, from the last ``w`` prefix queries
(:func:`~..selection.importance.window_token_importance`), and stored per layer in the `impress`
layout's ``h2o`` region. Because it does not depend on the query, the whole selection is known
before layer 0: every layer keeps its own top ``ceil(budget x n)`` tokens, shared by all heads, and
the K and V blocks holding them are requested at once, earlier layers first, so loading is
layer-pipelined (AttentionStore-like). Each layer then waits only for its own blocks.

Devices: the selection is made on the event loop before layer 0 and only yields the blocks to
request, so the importance stays on the host (decoding it onto the GPU would make the event loop
wait on the compute stream to read the choice back); each layer's gather positions, made there
too, reach the compute device with its K and V blocks through :func:`~..kvio.staging.to_device_now`.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import torch

from contiguouskv.compute_server.kvio.loader import Records
from contiguouskv.compute_server.kvio.staging import to_device_now
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
        scores = self.codec.token_importance(records, device="cpu")  # [L, n], host: see the module docstring
        self._futures: dict[int, tuple[Future[Records], Future[Records]]] = {}
        self._positions_at: dict[int, torch.Tensor] = {}
        for layer in layers:
            tokens = top_tokens(scores[layer : layer + 1], self.k).expand(lay.num_kv_heads, -1)  # [kv_heads, k]
            sel = self._selection(layer, tokens, shared=True, scores=scores[layer].clone())
            self._positions_at[layer] = self._positions(sel.blocks, tokens[:1])  # [1, k], host: rows are equal
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
        positions = to_device_now(self._positions_at.pop(layer), self.device).expand(self.blocks.num_kv_heads, -1)
        keys = self._take(self.codec.blocks(k_records, device=self.device), positions)
        values = self._take(self.codec.blocks(v_records, device=self.device), positions)
        return keys, values, wk + wv
