"""The IMPRESS baseline (FAST '25; PAPER_NOTES part B) over the `impress` layout, and the machinery
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

Choices where part B is silent (docs/baselines.md): the vote ranks tokens by the number of probe
heads that kept them, then by their summed probe scores, and keeps exactly k; under grouped-query
attention a "head" of the probe is an attention head and the fallback selects per KV head (the unit
whose keys are stored); ``s == t`` counts as similar.

Shapes: q ``[heads, T, d]`` and k_self ``[kv_heads, T, d]`` are the query's post-RoPE projections;
prefix keys ``[kv_heads or probe_kv, n, d]``; token sets are int64 ``[rows, k]``, ascending per row.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from contiguouskv.compute_server.policies.feedback import RegionScores
from contiguouskv.compute_server.layouts.impress import ImpressLayout, token_budget
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.layouts.packing import unpack_blocks
from contiguouskv.compute_server.policies.base import Policy
from contiguouskv.compute_server.model.runner import ModelRunner

ALPHA = 0.6


# --- selection math (pure torch) ----------------------------------------------------------------
def head_token_mass(q: torch.Tensor, k_self: torch.Tensor, keys: torch.Tensor, heads: list[int],
                    rows: list[int], scale: float) -> torch.Tensor:
    """Per listed query head, the attention its query rows pay to each prefix token: [len(heads), n].

    Softmax over [prefix ; the query's own causal keys], summed over query rows, prefix part only.
    Head ``heads[i]`` reads prefix keys ``keys[rows[i]]`` and self keys ``k_self[heads[i] // group]``.
    """
    group = q.shape[0] // k_self.shape[0]
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    out = torch.empty(len(heads), keys.shape[1], dtype=torch.float32, device=q.device)
    for row in sorted(set(rows)):  # heads sharing a key row go in one batch: [G, T, n]
        which = [i for i, r in enumerate(rows) if r == row]
        hs = [heads[i] for i in which]
        qh = q[hs].float()  # [G, T, d]
        prefix = torch.matmul(qh, keys[row].to(q.device).float().T) * scale  # [G, T, n]
        own = torch.stack([k_self[h // group] for h in hs]).float()  # [G, T, d]
        self_logits = (torch.matmul(qh, own.transpose(1, 2)) * scale).masked_fill(causal, float("-inf"))
        norm = torch.logsumexp(torch.cat([prefix, self_logits], dim=-1), dim=-1, keepdim=True)  # [G, T, 1]
        out[which] = torch.exp(prefix - norm).sum(dim=1)
    return out


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top ``k`` tokens of each row of ``scores`` [rows, n], ties to the lower index: [rows, k] ascending."""
    order = torch.sort(-scores.double(), dim=-1, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def mean_pairwise_jaccard(sets: torch.Tensor, num_tokens: int) -> float:
    """Mean Jaccard over all pairs of rows of ``sets`` [rows, k] (1.0 for a single row)."""
    masks = torch.zeros(sets.shape[0], num_tokens, dtype=torch.bool, device=sets.device)
    masks.scatter_(1, sets, True)
    pairs = list(itertools.combinations(range(sets.shape[0]), 2))
    if not pairs:
        return 1.0
    total = 0.0
    for a, b in pairs:
        inter = int((masks[a] & masks[b]).sum())
        total += inter / int((masks[a] | masks[b]).sum())
    return total / len(pairs)


def similarity_threshold(k: int, n: int, alpha: float = ALPHA) -> float:
    """IMPRESS's dynamic threshold t = j^alpha, j = r / (2 - r) with r = k / n."""
    r = k / n
    return (r / (2.0 - r)) ** alpha


def vote(sets: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The probe heads' vote: tokens by votes (heads that kept them), then summed score, then index.

    ``sets`` [P, k], ``scores`` [P, n]; returns [k] ascending.
    """
    votes = torch.zeros(scores.shape[1], dtype=torch.float64, device=sets.device)
    votes.index_add_(0, sets.reshape(-1), torch.ones(sets.numel(), dtype=torch.float64, device=sets.device))
    by_score = torch.sort(-scores.double().sum(dim=0), stable=True).indices  # ties keep index order
    by_votes = torch.sort(-votes[by_score], stable=True).indices
    return torch.sort(by_score[by_votes[:k]]).values


# --- token-level policies -----------------------------------------------------------------------
@dataclass
class LayerSelection:
    """What a token-level policy read and attended to at one layer."""

    layer: int
    tokens: torch.Tensor = field(repr=False)  # int64 [kv_heads, k], ascending; rows equal when shared
    shared: bool
    blocks: list[int] = field(repr=False)  # K/V blocks holding the selected tokens
    bytes_identification: int = 0
    bytes_kv: int = 0
    bytes_selected: int = 0
    similarity: float = -1.0
    threshold: float = -1.0
    scores: torch.Tensor | None = field(default=None, repr=False)  # float32 [n]: for the cache report
    fetched_blocks: dict[str, list[int]] = field(default_factory=dict, repr=False)  # region -> blocks read


class TokenPolicy(Policy):
    """Shared machinery of the token-level baselines: block reads, gathering, accounting, report."""

    def __init__(self, loader: KVLoader, runner: ModelRunner, budget: float, period: int, sub_period: int,
                 evaluate_recall: bool = False, *, blocks: ImpressLayout) -> None:
        super().__init__(loader, runner, budget, period, sub_period, evaluate_recall)
        self.blocks = blocks
        self.k = token_budget(budget, blocks.num_tokens)
        self.selections: list[LayerSelection] = []

    # --- reads ---------------------------------------------------------------------------------
    def _request(self, region: str, indices: list[int], category: str, priority: int) -> "Future[list[bytes]]":
        if not indices:
            done: Future[list[bytes]] = Future()
            done.set_result([])
            return done
        return self.loader.start_blob(region, indices, priority=priority, category=category)

    def _wait(self, future: "Future[list[bytes]]") -> tuple[list[bytes], float]:
        return self.loader.wait_blob(future)

    # --- gathering -----------------------------------------------------------------------------
    def _positions(self, blocks: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Where each token sits in the concatenation of ``blocks``' records."""
        b = self.blocks.block_size
        rank = torch.full((self.blocks.num_blocks,), -1, dtype=torch.int64)
        rank[torch.tensor(blocks, dtype=torch.int64)] = torch.arange(len(blocks))
        return rank[tokens // b] * b + tokens % b

    @staticmethod
    def _take(data: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows ``positions`` [kv_heads, k] of each head of ``data`` [kv_heads, s, d]: [kv_heads, k, d]."""
        return torch.gather(data, 1, positions[:, :, None].expand(-1, -1, data.shape[2]))

    def _selection(self, layer: int, tokens: torch.Tensor, shared: bool) -> LayerSelection:
        blocks = self.blocks.blocks_holding(torch.unique(tokens).tolist())
        return LayerSelection(layer, tokens, shared, blocks,
                              bytes_selected=self.blocks.selected_bytes(tokens.shape[1]))

    # --- reporting -----------------------------------------------------------------------------
    def chunks_at(self, layer: int) -> list[int]:
        """Blocks the layer read for attention (64-token blocks, not ContiguousChunks)."""
        return self.selections[layer].blocks

    def attention_report(self) -> list[RegionScores]:
        """Per region read, each block with its share of the layer's token scores and the fraction
        of its token-head slots that were selected (the `impress` cache score's important fraction).
        Probe records are reported as wholly used (each of their keys serves identification)."""
        lay = self.blocks
        b, nb = lay.block_size, lay.num_blocks
        slots = torch.full((nb,), float(b * lay.num_kv_heads), dtype=torch.float64)
        slots[-1] = (lay.num_tokens - (nb - 1) * b) * lay.num_kv_heads  # the last block may be short
        out: list[RegionScores] = []
        for sel in self.selections:
            counts = torch.bincount(sel.tokens.reshape(-1).cpu() // b, minlength=nb).double()
            fraction = (counts / slots).clamp(max=1.0)
            share = torch.zeros(nb, dtype=torch.float64)
            if sel.scores is not None and float(sel.scores.sum()) > 0:
                scores = sel.scores.double().cpu()
                share = torch.nn.functional.pad(scores, (0, nb * b - lay.num_tokens)).view(nb, b).sum(dim=1)
                share /= float(scores.sum())
            for region, blocks in sel.fetched_blocks.items():
                if region.startswith("probe/"):
                    out.append(RegionScores(region, blocks, [0.0] * len(blocks), [1.0] * len(blocks)))
                    continue
                index = torch.tensor(blocks, dtype=torch.int64)
                out.append(RegionScores(region, blocks, share[index].tolist(), fraction[index].tolist()))
        return out


class ImpressPolicy(TokenPolicy):
    """IMPRESS: probe-head identification per layer, vote or fallback, then the K/V blocks."""

    name = "impress"
    alpha = ALPHA

    async def start(self) -> None:
        """Nothing ahead of time: every layer identifies, then loads, in sequence."""

    def kv_for_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        lay, n = self.blocks, self.blocks.num_tokens
        everything = list(range(lay.num_blocks))
        probe_region = lay.probe_region(layer)
        records, waited = self._wait(self._request(probe_region, everything, "ident", 2 * layer))
        probe_keys = unpack_blocks(lay, records, len(lay.probe_kv_heads))[:, :n]  # [probe_kv, n, d]
        heads = list(lay.probe_query_heads)
        rows = [lay.probe_kv_heads.index(h // lay.group) for h in heads]
        mass = head_token_mass(q, k, probe_keys, heads, rows, self.runner.scaling)  # [P, n]
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
        tokens = vote(sets, mass, self.k).cpu()  # [k]
        sel = self._selection(layer, tokens.expand(lay.num_kv_heads, -1), shared=True)
        sel.scores = mass.sum(dim=0).cpu()
        fk = self._request(lay.k_region(layer), sel.blocks, "kv", 2 * layer)
        fv = self._request(lay.v_region(layer), sel.blocks, "kv", 2 * layer)
        k_records, wk = self._wait(fk)
        v_records, wv = self._wait(fv)
        positions = self._positions(sel.blocks, sel.tokens)  # [kv_heads, k]
        keys = self._take(unpack_blocks(lay, k_records, lay.num_kv_heads), positions)
        values = self._take(unpack_blocks(lay, v_records, lay.num_kv_heads), positions)
        sel.bytes_kv = 2 * len(sel.blocks) * lay.block_record_size
        sel.fetched_blocks = {lay.k_region(layer): sel.blocks, lay.v_region(layer): sel.blocks}
        return keys, values, sel, wk + wv

    def _fallback(self, layer: int, q: torch.Tensor, k: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, LayerSelection, float]:
        """Read every key of the layer, select per KV head, read the V blocks holding the union."""
        lay, n = self.blocks, self.blocks.num_tokens
        everything = list(range(lay.num_blocks))
        k_records, wk = self._wait(self._request(lay.k_region(layer), everything, "kv", 2 * layer))
        all_keys = unpack_blocks(lay, k_records, lay.num_kv_heads)[:, :n]  # [kv_heads, n, d]
        heads = list(range(lay.num_heads))
        mass = head_token_mass(q, k, all_keys, heads, [h // lay.group for h in heads], self.runner.scaling)
        per_kv = mass.view(lay.num_kv_heads, lay.group, n).sum(dim=1)  # [kv_heads, n]
        tokens = top_tokens(per_kv, self.k).cpu()  # [kv_heads, k]
        sel = self._selection(layer, tokens, shared=False)
        sel.scores = per_kv.sum(dim=0).cpu()
        v_records, wv = self._wait(self._request(lay.v_region(layer), sel.blocks, "kv", 2 * layer))
        keys = self._take(all_keys, tokens)
        values = self._take(unpack_blocks(lay, v_records, lay.num_kv_heads), self._positions(sel.blocks, tokens))
        sel.bytes_kv = (len(everything) + len(sel.blocks)) * lay.block_record_size
        sel.fetched_blocks = {lay.k_region(layer): everything, lay.v_region(layer): sel.blocks}
        return keys, values, sel, wk + wv

