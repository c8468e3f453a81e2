"""Layer-by-layer execution of a Hugging Face decoder (Qwen2/Qwen3/Llama/Mistral) on one sequence.

The runner reuses the HF model's modules (embeddings, norms, projections, MLP, rotary embedding,
lm_head) but owns the loop, so a caller can stop between stages of a layer: ``project`` gives the
post-RoPE queries and keys, a selection policy scores prefix chunks with them, and ``attend`` then
runs over whichever prefix KV was chosen.

Conventions (every method works on a single sequence, no batch dimension):

- Positions are absolute and explicit. A prefix of ``n`` tokens sits at positions ``0 .. n-1``; a
  query of ``T`` tokens that continues it sits at ``n .. n+T-1``, whatever subset of the prefix KV
  it attends to. Stored K is post-RoPE, so it is reused without re-rotation.
- Shapes: hidden ``[T, hidden_size]``; q ``[heads, T, head_dim]``; k, v ``[kv_heads, T, head_dim]``.
  Query head ``h`` reads KV head ``h // (heads // kv_heads)`` (grouped-query attention).
- Everything runs under ``torch.inference_mode`` in the model's dtype on its device; ``logits``
  returns float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from contiguouskv.compute_server.model.loading import LoadedModel

logger = logging.getLogger(__name__)

MAX_SCORES_PER_CALL = 1 << 28
"""Query rows per SDPA call are capped so heads x rows x keys stays below this, which bounds memory
even where the backend falls back to materialising the score matrix."""

LayerHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class PrefillResult:
    """What a prefill computed, per layer, for all ``n`` tokens (positions ``0 .. n-1``).

    ``keys``/``values``: post-RoPE ``[kv_heads, n, head_dim]`` per layer. ``logits``: float32
    ``[vocab]`` at position ``n-1``. ``last_queries``: post-RoPE ``[heads, w, head_dim]`` queries
    of the last ``w = keep_last_queries`` tokens per layer (empty list when ``w == 0``).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    last_queries: list[torch.Tensor] = field(default_factory=list)


class ModelRunner:
    """Stages of a decoder layer over a loaded HF model; see the module docstring for conventions."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._decoder = loaded.model.model
        self._lm_head = loaded.model.lm_head
        self.num_layers = loaded.num_layers
        self.num_heads = loaded.num_attention_heads
        self.num_kv_heads = loaded.num_kv_heads
        self.head_dim = loaded.head_dim
        attention = self._decoder.layers[0].self_attn
        self.scaling = float(getattr(attention, "scaling", self.head_dim**-0.5))
        self._has_qk_norm = hasattr(attention, "q_norm") and hasattr(attention, "k_norm")

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[T, hidden_size]`` of ``token_ids`` ``[T]``."""
        return self._decoder.embed_tokens(token_ids.to(self.device))

    @torch.inference_mode()
    def project(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, q/k/v projections (+ q/k norm if the model has them), RoPE at ``positions``
        ``[T]``. Returns contiguous q ``[H, T, d]``, k and v ``[kvH, T, d]``; q and k post-RoPE."""
        attention = self._decoder.layers[layer].self_attn
        x = self._decoder.layers[layer].input_layernorm(hidden)
        tokens = x.shape[0]
        q = attention.q_proj(x).view(tokens, self.num_heads, self.head_dim)  # [T, H, d]
        k = attention.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)  # [T, kvH, d]
        v = attention.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)  # [T, kvH, d]
        if self._has_qk_norm:
            q, k = attention.q_norm(q), attention.k_norm(k)
        cos, sin = self._rotary(hidden, positions)  # [T, d] each
        q = _rotate(q.transpose(0, 1), cos, sin).contiguous()  # [H, T, d]
        k = _rotate(k.transpose(0, 1), cos, sin).contiguous()  # [kvH, T, d]
        return q, k, v.transpose(0, 1).contiguous()  # v: [kvH, T, d]

    @torch.inference_mode()
    def attend(
        self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, num_past: int
    ) -> torch.Tensor:
        """Attention of the ``T`` new tokens; returns ``[T, H*d]`` (before o_proj).

        ``k_all``/``v_all`` are ``[kvH, num_past + T, d]``: ``num_past`` earlier keys every new
        token sees, then the new tokens' own keys, seen causally.
        """
        heads, tokens, _ = q.shape
        total = k_all.shape[1]
        if total != num_past + tokens:
            raise ValueError(f"k_all has {total} keys, expected num_past {num_past} + T {tokens}")
        rows = max(1, MAX_SCORES_PER_CALL // (heads * total))
        out = torch.empty_like(q)  # [H, T, d]
        for start in range(0, tokens, rows):
            stop = min(start + rows, tokens)
            seen = num_past + stop  # keys past the tile's last row are masked anyway: skip them
            out[:, start:stop] = self._sdpa(q[:, start:stop], k_all[:, :seen], v_all[:, :seen])
        return out.transpose(0, 1).reshape(tokens, heads * self.head_dim)  # [T, H*d]

    @torch.inference_mode()
    def finish(self, layer: int, hidden_in: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """o_proj + residual, post-attention norm + MLP + residual: ``[T, hidden_size]``."""
        block = self._decoder.layers[layer]
        hidden = hidden_in + block.self_attn.o_proj(attn_out)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    @torch.inference_mode()
    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One whole layer over past KV ``[kvH, S, d]`` (or none): ``(hidden_out, k_new, v_new)``."""
        q, k, v = self.project(layer, hidden, positions)
        if past_k is None or past_v is None:
            return self.finish(layer, hidden, self.attend(q, k, v, 0)), k, v
        k_all = torch.cat([past_k.to(device=k.device, dtype=k.dtype), k], dim=1)  # [kvH, S+T, d]
        v_all = torch.cat([past_v.to(device=v.device, dtype=v.dtype), v], dim=1)  # [kvH, S+T, d]
        out = self.attend(q, k_all, v_all, past_k.shape[1])
        return self.finish(layer, hidden, out), k, v

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: float32 ``[T, vocab]``."""
        return self._lm_head(self._decoder.norm(hidden)).float()

    @torch.inference_mode()
    def prefill(
        self,
        token_ids: torch.Tensor,
        block_size: int = 1024,
        keep_last_queries: int = 0,
        on_layer: LayerHook | None = None,
    ) -> PrefillResult:
        """Prefill ``token_ids`` ``[n]`` at positions ``0 .. n-1`` in blocks of ``block_size``.

        Each block runs through every layer, attending to the KV of earlier blocks, so activation
        memory is bounded by the block; the K/V of all tokens are returned (post-RoPE).
        ``on_layer(layer, q_block, k_block, v_block)``, if given, sees each block's projections.
        """
        token_ids = token_ids.to(self.device).reshape(-1)
        n = token_ids.shape[0]
        if n == 0 or block_size <= 0:
            raise ValueError("prefill needs at least one token and a positive block_size")
        if not 0 <= keep_last_queries <= n:
            raise ValueError(f"keep_last_queries must be in 0..{n}")
        shape = (self.num_kv_heads, n, self.head_dim)
        keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.empty_like(k) for k in keys]
        queries: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        keep_from = n - keep_last_queries
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            hidden = self.embed(token_ids[start:stop])  # [B, D]
            positions = torch.arange(start, stop, device=self.device)
            for layer in range(self.num_layers):
                q, k, v = self.project(layer, hidden, positions)
                keys[layer][:, start:stop] = k
                values[layer][:, start:stop] = v
                if on_layer is not None:
                    on_layer(layer, q, k, v)
                if stop > keep_from:
                    queries[layer].append(q[:, max(0, keep_from - start) :])  # [H, <=B, d]
                out = self.attend(q, keys[layer][:, :stop], values[layer][:, :stop], start)
                hidden = self.finish(layer, hidden, out)
        last_queries = [torch.cat(qs, dim=1) for qs in queries] if keep_last_queries else []
        return PrefillResult(keys, values, self.logits(hidden[-1:])[0], last_queries)

    def _rotary(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, d]`` in ``like``'s dtype at absolute ``positions`` (HF rotary module)."""
        position_ids = positions.to(self.device).reshape(1, -1)  # [1, T]
        cos, sin = self._decoder.rotary_emb(like, position_ids)  # [1, T, d] each
        return cos[0], sin[0]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA for q ``[H, R, d]`` over k/v ``[kvH, S', d]``, whose last ``R`` keys are the rows'
        own: row ``i`` sees keys ``0 .. S'-R+i``. Returns ``[H, R, d]``. KV heads are never copied
        up to query heads (:func:`_pack_query_groups`)."""
        heads, rows, dim = q.shape
        kv_heads, seen = k.shape[0], k.shape[1]
        groups = heads // kv_heads
        causal = rows == seen  # square: the kernel itself skips the upper triangle
        if groups > 1 and not causal and _pack_query_groups(q.device):
            # The g query heads of a KV head attend as one head of g*R rows (head h = kv*g + j, so
            # [H, R, d] is [kvH, g*R, d] in memory order); the mask repeats for each of them.
            packed = q.reshape(kv_heads, groups * rows, dim).unsqueeze(0)
            mask = _visible(seen - rows, seen, seen, q.device).repeat(groups, 1)  # [g*R, S']
            out = F.scaled_dot_product_attention(
                packed, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=self.scaling)
            return out[0].reshape(heads, rows, dim)
        # 4-D inputs: with 3-D ones the CPU dispatcher falls back to the (3x slower) math kernel.
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, heads, tokens, d]
        mask = None if causal else _visible(seen - rows, seen, seen, q.device)  # [R, S']
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=mask, is_causal=causal, scale=self.scaling, enable_gqa=groups > 1
        )
        return out[0]  # [H, R, d]


def _pack_query_groups(device: torch.device) -> bool:
    """Whether masked grouped-query attention folds each KV head's query heads into one head's rows.

    CPU's fused kernel takes grouped KV with a mask (``enable_gqa``). CUDA's masked kernel
    (memory-efficient) does not, and its fallback would materialise the score matrix; copying the
    KV heads up to query heads (HF's ``repeat_kv``) would instead move g times the KV through
    memory at every layer. Folding the g query heads of a KV head into one head of g*R rows needs
    neither: the same kernel, the same scores, a mask g times taller (R x S' booleans each). The
    unmasked square case (prefill) passes ``enable_gqa``, which the flash kernel takes."""
    return device.type != "cpu"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as in HF ``apply_rotary_pos_emb``: ``x`` ``[heads, T, d]``, cos/sin ``[T, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _visible(first: int, stop: int, total: int, device: torch.device) -> torch.Tensor:
    """Bool mask ``[stop-first, total]``: row ``r`` (a key index) sees key indices ``0 .. r``."""
    rows = torch.arange(first, stop, device=device).unsqueeze(1)  # [R, 1]
    return torch.arange(total, device=device).unsqueeze(0) <= rows  # [R, total]
