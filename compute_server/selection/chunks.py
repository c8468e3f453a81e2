"""Chunk scoring and top-k selection for the `contiguous` policies (pure torch, no I/O).

Scores follow the paper (docs/reprefill.md): softmax attention of every query token over the prefix
tokens, normalised together with the query's own causal keys, summed over query tokens and over all
heads (query head h reads KV head h // (heads / kv_heads)), then summed per chunk.

Shapes: q [heads, W, d] and k_self [kv_heads, T, d] are the query's post-RoPE projections at the
scored layer, q's rows the query's last W <= T tokens (:func:`query_window`; W = T: all of them);
prefix keys are [kv_heads, n, d]; digests are float32 [m, kv_heads, d].

Devices: every operand must already be on the query's device (prefix keys and digests reach it
through :func:`~..kvio.staging.to_device_now`, via the codec); every tensor made here is made on
``q.device`` and scores are returned there. Only :func:`select_top`'s chunk list crosses to Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from contiguouskv.compute_server.config import SCORE_DTYPES, SCORE_HEADS
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.selection.importance import per_chunk
from contiguouskv.compute_server.selection.keyquant import PackedKeys
from contiguouskv.compute_server.workspace import Workspace


def _self_logits(q: torch.Tensor, k_self: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal logits of the query over its own keys: [heads, W, T], -inf where a key comes after its
    row. The W rows are the query's last W tokens (``W == T``: all of it, -inf above the diagonal)."""
    groups = q.shape[0] // k_self.shape[0]
    k = k_self.float().repeat_interleave(groups, dim=0)  # [heads, T, d]
    logits = torch.matmul(q.float(), k.transpose(1, 2)) * scale  # [heads, W, T]
    w, t = q.shape[1], k_self.shape[1]
    if w > t:
        raise ValueError(f"q has {w} rows but the query only {t} keys")
    return logits.masked_fill(torch.ones(w, t, dtype=torch.bool, device=q.device).triu(t - w + 1), float("-inf"))


def query_window(q: torch.Tensor, window: int) -> torch.Tensor:
    """The query rows that score: the last ``window`` tokens of q [heads, T, d] (0: all of them).
    Their softmax still runs over every prefix key and every query key up to each row."""
    return q if window <= 0 or window >= q.shape[1] else q[:, -window:]


def _combine_heads(per_head: torch.Tensor, heads: str) -> torch.Tensor:
    """[heads, ...] masses -> [...] by :data:`SCORE_HEADS`."""
    if heads == "sum":
        return per_head.sum(dim=0)
    if heads == "max":
        return per_head.amax(dim=0)
    raise ValueError(f"heads: must be one of {SCORE_HEADS}, got {heads!r}")


def _prefix_mass(prefix_logits: torch.Tensor, self_logits: torch.Tensor, heads: str = "sum") -> torch.Tensor:
    """Softmax over [prefix ; self] per row, summed over rows, heads combined (:data:`SCORE_HEADS`),
    prefix part only: [n or m]."""
    norm = torch.logsumexp(torch.cat([prefix_logits, self_logits], dim=-1), dim=-1, keepdim=True)  # [H, T, 1]
    return _combine_heads(torch.exp(prefix_logits - norm).sum(dim=1), heads)


def score_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the scorers' key matmuls run in: ``setting`` (``score_dtype`` of the config), or
    for ``auto`` bfloat16 where the device multiplies it natively (CUDA; a CPU with AVX512-BF16 or
    AMX, where the scores of a 16K-token layer took 1.6x less time than in float32:
    docs/performance.md) and float32 elsewhere.
    Only the q.k products are rounded to it; the softmax and the mass sums stay in float32."""
    if setting not in SCORE_DTYPES:
        raise ValueError(f"score_dtype: must be one of {SCORE_DTYPES}, got {setting!r}")
    if setting != "auto":
        return torch.float32 if setting == "float32" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def exact_chunk_scores(layout: ContiguousLayout, q: torch.Tensor, k_self: torch.Tensor,
                       prefix_keys: torch.Tensor, scale: float, workspace: Workspace | None = None,
                       dtype: torch.dtype = torch.float32, heads: str = "sum") -> torch.Tensor:
    """Per-chunk attention mass [m] from all prefix keys of the layer (the paper's scoring).

    ``heads``: how the query heads' masses combine (:data:`SCORE_HEADS`; ``sum`` is the paper's).

    One KV head at a time (memory bounded by ``[groups * W, n]`` logits), in place: the logits
    become ``exp(logit - row max)`` in their buffer and their row-normalised column sums are one
    matrix-vector product, so a call allocates nothing of the prefix's size beyond that buffer
    (taken from ``workspace`` when given: then not even that, after the first call).

    ``dtype``: what the q.k matmul runs in (:func:`score_dtype`). With bfloat16 the scaled query
    and the keys are bfloat16 (keys of another dtype are converted into the workspace first), the
    products accumulate in float32 inside the matmul and are rounded once to bfloat16; everything
    after (row max, exp, the normalised sums) is float32.
    """
    workspace = workspace or Workspace()
    n, d = prefix_keys.shape[1], prefix_keys.shape[2]

    def products_of(g: int, qs: torch.Tensor, products: torch.Tensor) -> None:
        keys = prefix_keys[g]
        if keys.dtype != dtype:
            keys = workspace.get("keys", (n, d), q.device, dtype).copy_(keys)
        torch.matmul(qs, keys.T, out=products)

    return _chunk_mass(layout, q, k_self, n, scale, workspace, dtype, heads, products_of)


SCORE_TILE_TOKENS = 4096
"""Keys per decoded tile in :func:`packed_chunk_scores` on a CPU (one KV head: 2 MiB in float32).
At 16K tokens of `random:kvheavy`, 8 query rows, one thread, the products took 8.6 / 7.4 / 6.8 /
8.0 ms with tiles of 512 / 1,024 / 2,048 / 4,096 tokens in one measurement and 11.5 / 9.9 ms with
2,048 / 4,096 in another, against 19–21 ms to decode the layer whole and score it. The larger tile
wins where it matters: every op of the loop gives up the GIL and takes it back, and with another
thread running Python (the event loop, a look-ahead) each take can wait out the interpreter's switch
interval; 4,096 has half the ops of 2,048. Measured with `contiguouskv bench kernels`
(``qkeys_scores``, docs/bench/cpu-kernels-kvheavy-tiled.json): 8.1 ms tiled against 18.8 ms."""


def score_tile_tokens(device: torch.device) -> int | None:
    """:func:`packed_chunk_scores`' tile on ``device``: one tile (the whole layer) on a GPU, where
    each tile's kernels cost a launch and memory is not the limit."""
    return None if device.type == "cuda" else SCORE_TILE_TOKENS


def packed_chunk_scores(layout: ContiguousLayout, q: torch.Tensor, k_self: torch.Tensor, keys: PackedKeys,
                        scale: float, workspace: Workspace | None = None, dtype: torch.dtype = torch.float32,
                        heads: str = "sum", tile_tokens: int | None = None) -> torch.Tensor:
    """:func:`exact_chunk_scores` over quantised keys, decoded a tile at a time: per KV head,
    ``tile_tokens`` keys (whole quantisation groups; None: all of them, one tile) are decoded into
    one reused buffer of ``dtype`` and multiplied at once. On a CPU a tile that stays in cache
    spares the decoded layer's round trip through memory (written whole, then read back by the
    matmul), which cost more than the arithmetic (docs/performance.md). The products, hence the
    scores, are those of the decoded keys: the same values, the same matmul per key."""
    workspace = workspace or Workspace()
    n, d, group = keys.num_tokens, keys.head_dim, keys.group
    step = keys.num_groups if tile_tokens is None else max(1, tile_tokens // group)
    tile = workspace.get("tile", (1, min(step, keys.num_groups) * group, d), q.device, dtype)

    def products_of(g: int, qs: torch.Tensor, products: torch.Tensor) -> None:
        for first in range(0, keys.num_groups, step):
            stop = min(keys.num_groups, first + step)
            part = keys.decode(tile[:, : (stop - first) * group], slice(g, g + 1), first, stop)
            lo, hi = first * group, min(stop * group, n)
            torch.matmul(qs, part[0, : hi - lo].T, out=products[:, lo:hi])

    return _chunk_mass(layout, q, k_self, n, scale, workspace, dtype, heads, products_of)


def _chunk_mass(layout: ContiguousLayout, q: torch.Tensor, k_self: torch.Tensor, n: int, scale: float,
                workspace: Workspace, dtype: torch.dtype, heads: str,
                products_of: Callable[[int, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """The scorers' common part: ``products_of(g, scaled query rows of KV head g [groups * W, d],
    out [groups * W, n])`` writes the q.k products of KV head ``g``'s query rows in ``dtype``; the
    softmax over [prefix ; causal self] and the per-chunk masses follow, in float32, in place."""
    if heads not in SCORE_HEADS:
        raise ValueError(f"heads: must be one of {SCORE_HEADS}, got {heads!r}")
    num_heads, t, d = q.shape
    kv_heads = k_self.shape[0]
    groups = num_heads // kv_heads
    self_logits = _self_logits(q, k_self, scale).view(kv_heads, groups * t, k_self.shape[1])
    qs = (q.float() * scale).to(dtype).view(kv_heads, groups * t, d)  # the scale folded into the query
    logits = workspace.get("logits", (groups * t, n), q.device)
    products = logits if dtype == torch.float32 else workspace.get("products", (groups * t, n), q.device, dtype)
    token_mass = torch.zeros(n, dtype=torch.float32, device=q.device)
    best = torch.zeros(layout.num_chunks, dtype=torch.float32, device=q.device)  # the largest head's, per chunk
    for g in range(kv_heads):
        products_of(g, qs[g], products)  # [groups * T, n], scaled
        own = self_logits[g]  # [groups * T, T]
        top = torch.maximum(products.amax(dim=1).float(), own.amax(dim=1)).unsqueeze(1)  # row max over [prefix ; self]
        if products is not logits:  # a plain copy, then in place: a mixed-dtype sub makes a
            logits.copy_(products)  # prefix-sized float32 temporary, mmap-ed afresh every call
        logits.sub_(top).exp_()  # float32 from here on
        total = logits.sum(dim=1) + torch.exp(own - top).sum(dim=1)  # softmax denominators [groups * T]
        if heads == "sum":
            token_mass.addmv_(logits.T, total.reciprocal_())
        else:  # each query head's row-normalised column sums, [groups, n]: one batched product
            per_head = torch.bmm(total.reciprocal_().view(groups, 1, t), logits.view(groups, t, n)).squeeze(1)
            torch.maximum(best, per_chunk(layout, per_head).amax(dim=0), out=best)
    return per_chunk(layout, token_mass) if heads == "sum" else best


def _chunk_token_counts(layout: ContiguousLayout, device: torch.device) -> torch.Tensor:
    """Real tokens per chunk, float32 [m] on ``device`` (every chunk full but maybe the last)."""
    counts = torch.full((layout.num_chunks,), float(layout.chunk_size), dtype=torch.float32, device=device)
    counts[-1] = float(layout.num_tokens - (layout.num_chunks - 1) * layout.chunk_size)
    return counts


def digest_chunk_scores(layout: ContiguousLayout, q: torch.Tensor, k_self: torch.Tensor,
                        digest: torch.Tensor, scale: float) -> torch.Tensor:
    """Approximate per-chunk mass [m]: every key of chunk j taken as its mean key (the digest)."""
    groups = q.shape[0] // digest.shape[1]
    counts = _chunk_token_counts(layout, q.device)
    mean_keys = digest.float().repeat_interleave(groups, dim=1).transpose(0, 1)  # [heads, m, d]
    logits = torch.matmul(q.float(), mean_keys.transpose(1, 2)) * scale + torch.log(counts)  # [heads, T, m]
    return _prefix_mass(logits, _self_logits(q, k_self, scale))


def quest_chunk_scores(layout: ContiguousLayout, q: torch.Tensor, k_self: torch.Tensor,
                       minmax: torch.Tensor, scale: float, heads: str = "sum") -> torch.Tensor:
    """Per-chunk mass [m] from Quest's upper bound of q.k: per channel the larger of q*min and q*max,
    summed over channels, stands for every key of the chunk (``minmax``: [m, kv_heads, 2, d])."""
    groups = q.shape[0] // minmax.shape[1]
    counts = _chunk_token_counts(layout, q.device)
    bounds = minmax.float().repeat_interleave(groups, dim=1).transpose(0, 1)  # [heads, m, 2, d]
    center = (bounds[:, :, 0] + bounds[:, :, 1]) / 2  # max(q*lo, q*hi) = q*center + |q|*radius
    radius = (bounds[:, :, 1] - bounds[:, :, 0]) / 2
    qf = q.float()
    upper = torch.matmul(qf, center.transpose(1, 2)) + torch.matmul(qf.abs(), radius.transpose(1, 2))
    logits = upper * scale + torch.log(counts)  # [heads, T, m]
    return _prefix_mass(logits, _self_logits(q, k_self, scale), heads)


def shortlist_chunk_scores(layout: ContiguousLayout, q: torch.Tensor, k_self: torch.Tensor, digest: torch.Tensor,
                           shortlist: list[int], keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Chunk mass [m]: exact for ``shortlist`` (``keys`` = their keys, [kv_heads, len * c, d], chunks
    ascending), digest-approximated for the rest, all normalised together with the query's own keys.
    Only shortlisted chunks get a score above zero.
    """
    heads, kv_heads = q.shape[0], digest.shape[1]
    groups = heads // kv_heads
    c, m, device = layout.chunk_size, layout.num_chunks, q.device
    chunks = torch.tensor(shortlist, dtype=torch.int64, device=device)  # [len]
    chunk_of = chunks.repeat_interleave(c)  # [len * c]
    token = chunk_of * c + torch.arange(c, device=device).repeat(len(shortlist))  # prefix position of each key
    real = token < layout.num_tokens  # False on the padding of a partial last chunk
    exact = torch.matmul(q.float(), keys.float().repeat_interleave(groups, dim=0).transpose(1, 2)) * scale
    exact = exact.masked_fill(~real, float("-inf"))  # [heads, T, len * c]
    others = torch.ones(m, dtype=torch.bool, device=device)
    others[chunks] = False
    counts = _chunk_token_counts(layout, device)
    means = digest.float().repeat_interleave(groups, dim=1).transpose(0, 1)[:, others]  # [heads, m', d]
    rough = torch.matmul(q.float(), means.transpose(1, 2)) * scale + torch.log(counts[others])
    logits = torch.cat([exact, rough, _self_logits(q, k_self, scale)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., : exact.shape[-1]].sum(dim=(0, 1))  # [len * c]
    out = torch.zeros(m, dtype=torch.float32, device=device)
    out.index_add_(0, chunk_of, probs)
    return out


def budget_chunks(budget: float, num_chunks: int) -> int:
    """How many chunks a budget keeps: ceil(budget x m), at least the sink and last chunk."""
    return min(num_chunks, max(math.ceil(budget * num_chunks - 1e-9), min(2, num_chunks)))


def select_top(scores: torch.Tensor, budget: float) -> list[int]:
    """Top ceil(budget x m) chunks by score, always with the first and last; ties to the lower index.

    Returns sorted chunk indices. ``scores`` may be on any device; the one ``tolist`` at the end
    is the only transfer to the host.
    """
    m = scores.shape[0]
    k = budget_chunks(budget, m)
    forced = sorted({0, m - 1})
    inner = scores[1 : m - 1] if m > 2 else scores[:0]  # chunks 1 .. m-2: the candidates
    order = torch.sort(-inner.double(), stable=True).indices  # ties keep index order
    picked = (order[: max(0, k - len(forced))] + 1).tolist()
    return sorted(set(forced) | set(picked))
