"""The IMPRESS baseline (FAST '25; docs/baselines.md) over the `impress` layout, and the machinery
it shares with the `h2o` baseline: token-level selection served from 64-token K/V blocks.

IMPRESS, per layer and strictly in sequence (no cross-layer prefetch, B3 and part C):

1. read the layer's probe keys (the duplicated keys of the first 3 attention heads);
2. score every prefix token for each probe head: the column sum of that head's softmax attention
   of the query tokens over [prefix ; query] (H2O-style importance, B2), and take each probe
   head's top ``k = ceil(budget x n)`` tokens;
3. compare the mean pairwise Jaccard ``s`` of those sets with ``t = j^alpha``,
   ``j = r / (2 - r)``, ``r = k / n`` (the expected Jaccard of two random k-subsets; alpha 0.6);
4. ``s >= t``: the probe heads vote and one set of k tokens serves every head; read the K and V
   blocks holding them. Otherwise fall back: read all keys of the layer, take each KV head's own
   top-k tokens (query heads of a GQA group summed), and read the V blocks holding them.

Choices where the IMPRESS paper is silent (docs/baselines.md): the vote ranks tokens by the number of probe
heads that kept them, then by their summed probe scores, and keeps exactly k; under grouped-query
attention a "head" of the probe is an attention head and the fallback selects per KV head (the unit
whose keys are stored); ``s == t`` counts as similar.

Shapes: q ``[heads, T, d]`` and k_self ``[kv_heads, T, d]`` are the query's post-RoPE projections;
prefix keys ``[kv_heads or probe_kv, n, d]``; token sets are int64 ``[rows, k]``, ascending per row.
"""

from __future__ import annotations

import torch

from contiguouskv.compute_server.policies.token_level import LayerSelection, TokenPolicy
from contiguouskv.compute_server.selection.tokens import (
    ALPHA, head_token_mass, mean_pairwise_jaccard, similarity_threshold, top_tokens, vote,
)


class ImpressPolicy(TokenPolicy):
    """IMPRESS: probe-head identification per layer, vote or fallback, then the K/V blocks."""

    name = "impress"
    alpha = ALPHA

    async def start_load_kv(self) -> None:
        """Nothing ahead of time: every layer identifies, then loads, in sequence."""

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        lay, n = self.blocks, self.blocks.num_tokens
        everything = list(range(lay.num_blocks))
        probe_region = lay.probe_region(layer)
        records, waited = self._wait(self._request(probe_region, everything, "ident", 2 * layer))
        probe_keys = self.codec.blocks(records, len(lay.probe_kv_heads), device=self.device)[:, :n]  # [probe_kv, n, d]
        with self.selecting():
            heads = list(lay.probe_query_heads)
            rows = [lay.probe_kv_heads.index(h // lay.group) for h in heads]
            mass = head_token_mass(q, k, probe_keys, heads, rows, self.projector.scaling)  # [P, n]
            sets = top_tokens(mass, self.k)  # [P, k]
            similarity = mean_pairwise_jaccard(sets, n)
            threshold = similarity_threshold(self.k, n, self.alpha)
        if similarity >= threshold:
            keys, values, sel, wait = self._voted(layer, sets, mass)
        else:
            keys, values, sel, wait = self._fallback(layer, q, k)
        sel.similarity, sel.threshold = similarity, threshold
        sel.bytes_identification = len(everything) * lay.probe_record_size
        sel.fetched_blocks = {probe_region: everything, **sel.fetched_blocks}
        self.selections.append(sel)
        return keys, values, waited + wait

    def _voted(self, layer: int, sets: torch.Tensor, mass: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, LayerSelection, float]:
        """One token set for every head: read only the K and V blocks holding it."""
        lay = self.blocks
        with self.selecting():
            tokens = vote(sets, mass, self.k).expand(lay.num_kv_heads, -1)  # [kv_heads, k], rows equal
        sel = self._selection(layer, tokens, shared=True, scores=mass.sum(dim=0))
        fk = self._request(lay.k_region(layer), sel.blocks, "kv", 2 * layer)
        fv = self._request(lay.v_region(layer), sel.blocks, "kv", 2 * layer)
        k_records, wk = self._wait(fk)
        v_records, wv = self._wait(fv)
        positions = self._positions(sel.blocks, tokens)  # [kv_heads, k]
        keys = self._take(self.codec.blocks(k_records, device=self.device), positions)
        values = self._take(self.codec.blocks(v_records, device=self.device), positions)
        sel.bytes_kv = 2 * len(sel.blocks) * lay.block_record_size
        sel.fetched_blocks = {lay.k_region(layer): sel.blocks, lay.v_region(layer): sel.blocks}
        return keys, values, sel, wk + wv

    def _fallback(self, layer: int, q: torch.Tensor, k: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, LayerSelection, float]:
        """Read every key of the layer, select per KV head, read the V blocks holding the union."""
        lay, n = self.blocks, self.blocks.num_tokens
        everything = list(range(lay.num_blocks))
        k_records, wk = self._wait(self._request(lay.k_region(layer), everything, "kv", 2 * layer))
        all_keys = self.codec.blocks(k_records, device=self.device)[:, :n]  # [kv_heads, n, d]
        with self.selecting():
            heads = list(range(lay.num_heads))
            mass = head_token_mass(q, k, all_keys, heads, [h // lay.group for h in heads], self.projector.scaling)
            per_kv = mass.view(lay.num_kv_heads, lay.group, n).sum(dim=1)  # [kv_heads, n]
            tokens = top_tokens(per_kv, self.k)  # [kv_heads, k]
        sel = self._selection(layer, tokens, shared=False, scores=per_kv.sum(dim=0))
        v_records, wv = self._wait(self._request(lay.v_region(layer), sel.blocks, "kv", 2 * layer))
        keys = self._take(all_keys, tokens)
        values = self._take(self.codec.blocks(v_records, device=self.device), self._positions(sel.blocks, tokens))
        sel.bytes_kv = (len(everything) + len(sel.blocks)) * lay.block_record_size
        sel.fetched_blocks = {lay.k_region(layer): everything, lay.v_region(layer): sel.blocks}
        return keys, values, sel, wk + wv
