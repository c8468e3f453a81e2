"""Token-level selection math of the IMPRESS and H2O baselines (pure torch, no I/O).

Shapes: q ``[heads, T, d]`` and k_self ``[kv_heads, T, d]`` are the query's post-RoPE projections;
prefix keys ``[kv_heads or probe_kv, n, d]``; token sets are int64 ``[rows, k]``, ascending per row.

Devices: every operand must already be on the query's device (prefix keys reach it through
:func:`~..kvio.staging.to_device_now`, via the codec); tensors made here are made on the device of
the inputs and results stay there.
"""

from __future__ import annotations

import itertools

import torch

ALPHA = 0.6
"""IMPRESS's exponent of the similarity threshold."""


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
        prefix = torch.matmul(qh, keys[row].float().T) * scale  # [G, T, n]
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
    pairs = list(itertools.combinations(range(sets.shape[0]), 2))
    if not pairs:
        return 1.0
    masks = torch.zeros(sets.shape[0], num_tokens, dtype=torch.bool, device=sets.device)
    masks.scatter_(1, sets, True)
    inter = (masks[:, None, :] & masks[None, :, :]).sum(dim=-1)  # [rows, rows]
    union = (masks[:, None, :] | masks[None, :, :]).sum(dim=-1)
    counts = torch.stack([inter, union]).tolist()  # one transfer to the host
    total = 0.0
    for a, b in pairs:
        total += counts[0][a][b] / counts[1][a][b]
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
