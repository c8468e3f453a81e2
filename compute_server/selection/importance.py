"""Chunk importance from attention: the static prior stored at registration.

Shapes: ``q`` is [heads, w, d] (post-RoPE queries), ``keys`` is [kv_heads, n, d] (post-RoPE);
query head h reads KV head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import torch

from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout


def per_chunk(layout: ContiguousLayout, token_scores: torch.Tensor) -> torch.Tensor:
    """Sum token scores [..., n] into chunk scores [..., m]."""
    pad = layout.num_chunks * layout.chunk_size - token_scores.shape[-1]
    padded = torch.nn.functional.pad(token_scores, (0, pad))
    return padded.view(*token_scores.shape[:-1], layout.num_chunks, layout.chunk_size).sum(dim=-1)


def window_importance(layout: ContiguousLayout, q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention the last ``w`` prefix tokens pay to each chunk, summed over heads and queries: [m].

    The window's queries sit at positions n-w .. n-1 and see keys causally.
    """
    heads, w, _ = q.shape
    kv_heads, n, _ = keys.shape
    k = keys.float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, n, d]
    scores = torch.matmul(q.float(), k.transpose(1, 2)) * scale  # [heads, w, n]
    query_pos = torch.arange(n - w, n, device=q.device)[:, None]  # [w, 1]
    scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > query_pos, float("-inf"))
    token_scores = torch.softmax(scores, dim=-1).sum(dim=(0, 1))  # [n]
    return per_chunk(layout, token_scores)


def window_token_importance(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-token version of :func:`window_importance` (the `h2o` baseline's static importance): [n].

    H2O accumulates the attention every later query pays to each token (column sums of the softmax
    matrix). Over all n queries that costs an n x n pass per layer at registration; this takes the
    column sums over the last ``w`` prefix queries only, summed over heads.
    """
    heads, w, _ = q.shape
    kv_heads, n, _ = keys.shape
    groups = heads // kv_heads
    query_pos = torch.arange(n - w, n, device=q.device)[:, None]  # [w, 1]
    hidden = torch.arange(n, device=q.device)[None, :] > query_pos  # [w, n]: causal
    out = torch.zeros(n, dtype=torch.float32, device=q.device)
    for g in range(kv_heads):  # one KV head at a time bounds memory to [groups, w, n]
        scores = torch.matmul(q[g * groups : (g + 1) * groups].float(), keys[g].float().T) * scale
        out += torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).sum(dim=(0, 1))
    return out.cpu()
