"""Tensors <-> record bytes for the `contiguous` layout (see :mod:`layout` for the byte order) and
for the `impress` layout of the token-level baselines (:mod:`impress_layout`).

Packing runs once per registered prefix; unpacking runs per arriving record batch, so it only makes
views over the received bytes and copies each record once, into its destination slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import warnings

import torch

from contiguouskv.compute_server.layouts.impress import ImpressLayout
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _chunked(layout: ContiguousLayout, k: torch.Tensor) -> torch.Tensor:
    """[kv_heads, n, d] -> [m, kv_heads, c, d], zero-padding the last chunk."""
    pad = layout.num_chunks * layout.chunk_size - k.shape[1]
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    kvh, _, d = k.shape
    return k.reshape(kvh, layout.num_chunks, layout.chunk_size, d).permute(1, 0, 2, 3)


def pack_kv_group(layout: ContiguousLayout, group: int, keys: Sequence[torch.Tensor],
                  values: Sequence[torch.Tensor]) -> torch.Tensor:
    """All records of ``kv/G{group}`` as one tensor [m, g_i, 2, kv_heads, c, d] in record order."""
    first = group * layout.group_size
    layers = range(first, first + layout.layers_in_group(group))
    per_layer = [torch.stack([_chunked(layout, keys[l]), _chunked(layout, values[l])], dim=1) for l in layers]
    return torch.stack(per_layer, dim=1).contiguous()  # [m, g_i, 2, kv_heads, c, d]


def chunk_digest(layout: ContiguousLayout, k: torch.Tensor) -> torch.Tensor:
    """Mean key per chunk and KV head over the chunk's real tokens, float32 [m, kv_heads, d]."""
    chunked = _chunked(layout, k.float())  # [m, kv_heads, c, d]
    counts = torch.tensor([e - s for s, e in map(layout.chunk_tokens, range(layout.num_chunks))],
                          dtype=torch.float32)
    return chunked.sum(dim=2) / counts[:, None, None]


def iter_region_payloads(layout: ContiguousLayout, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                         importance: torch.Tensor, token_ids: Sequence[int],
                         batch_bytes: int = 1 << 20) -> Iterator[tuple[str, int, memoryview]]:
    """Yield (region, first_record, bytes of whole records) covering every region of the layout.

    ``keys``/``values``: per layer [kv_heads, n, d] in the layout dtype (post-RoPE keys).
    ``importance``: float32 [L, m] static chunk importance.
    """
    for group in range(layout.num_groups):
        yield from _batches(layout.kv_region(group), layout.kv_record_size,
                            _as_bytes(pack_kv_group(layout, group, keys, values)), batch_bytes)
    for layer in range(layout.num_layers):
        yield from _batches(layout.idkeys_region(layer), layout.token_bytes,
                            _as_bytes(_chunked(layout, keys[layer])), batch_bytes)
    for layer in range(layout.num_layers):
        yield layout.digest_region(layer), 0, _as_bytes(chunk_digest(layout, keys[layer]))
    if tuple(importance.shape) != (layout.num_layers, layout.num_chunks):
        raise ValueError(f"importance must be [L, m], got {tuple(importance.shape)}")
    yield "stats", 0, _as_bytes(importance.to(torch.float32))
    yield "tokens", 0, _as_bytes(torch.tensor(list(token_ids), dtype=torch.int64).to(torch.int32))


def _batches(region: str, record_size: int, data: memoryview, batch_bytes: int) -> Iterator[tuple[str, int, memoryview]]:
    per_batch = max(1, batch_bytes // record_size)
    step = per_batch * record_size
    for offset in range(0, len(data), step):
        yield region, offset // record_size, data[offset : offset + step]


def frombuffer(payload: memoryview | bytes, dtype: torch.dtype) -> torch.Tensor:
    """A read-only tensor view over received bytes (never written: callers copy out of it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we only read
        return torch.frombuffer(payload, dtype=dtype)


def unpack_kv_record(layout: ContiguousLayout, payload: memoryview | bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One kv record -> (K, V), each a [kv_heads, c, d] view over ``payload`` (no copy)."""
    t = frombuffer(payload, TORCH_DTYPES[layout.dtype])
    t = t.view(2, layout.num_kv_heads, layout.chunk_size, layout.head_dim)
    return t[0], t[1]


def unpack_tokens(payload: memoryview | bytes) -> list[int]:
    return frombuffer(payload, torch.int32).tolist()


def unpack_importance(layout: ContiguousLayout, payload: memoryview | bytes) -> torch.Tensor:
    return frombuffer(payload, torch.float32).view(layout.num_layers, layout.num_chunks)


# --- the `impress` layout (token-level baselines) --------------------------------------------------
def _blocked(layout: ImpressLayout, x: torch.Tensor) -> torch.Tensor:
    """[heads, n, d] -> [nb, heads, b, d], zero-padding the last block."""
    pad = layout.num_blocks * layout.block_size - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    heads, _, d = x.shape
    return x.reshape(heads, layout.num_blocks, layout.block_size, d).permute(1, 0, 2, 3).contiguous()


def iter_impress_payloads(layout: ImpressLayout, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                          token_importance: torch.Tensor,
                          batch_bytes: int = 1 << 20) -> Iterator[tuple[str, int, memoryview]]:
    """Yield (region, first_record, bytes of whole records) covering every region of ``layout``.

    ``keys``/``values``: per layer [kv_heads, n, d] in the layout dtype (post-RoPE keys).
    ``token_importance``: float32 [L, n] static token importance (the `h2o` region).
    """
    if tuple(token_importance.shape) != (layout.num_layers, layout.num_tokens):
        raise ValueError(f"token_importance must be [L, n], got {tuple(token_importance.shape)}")
    probe = list(layout.probe_kv_heads)
    for layer in range(layout.num_layers):
        yield from _batches(layout.k_region(layer), layout.block_record_size,
                            _as_bytes(_blocked(layout, keys[layer])), batch_bytes)
        yield from _batches(layout.v_region(layer), layout.block_record_size,
                            _as_bytes(_blocked(layout, values[layer])), batch_bytes)
        yield from _batches(layout.probe_region(layer), layout.probe_record_size,
                            _as_bytes(_blocked(layout, keys[layer][probe])), batch_bytes)
    yield from _batches(layout.importance_region, layout.importance_record_size,
                        _as_bytes(token_importance.to(torch.float32)), batch_bytes)


def unpack_blocks(layout: ImpressLayout, records: Sequence[memoryview | bytes], heads: int) -> torch.Tensor:
    """Block records of ``heads`` heads each -> one tensor [heads, len(records) * b, d] (a copy)."""
    if not records:
        return torch.empty(heads, 0, layout.head_dim, dtype=TORCH_DTYPES[layout.dtype])
    dtype = TORCH_DTYPES[layout.dtype]
    blocks = [frombuffer(r, dtype).view(heads, layout.block_size, layout.head_dim) for r in records]
    return torch.cat(blocks, dim=1)  # [heads, blocks * b, d]


def unpack_token_importance(layout: ImpressLayout, records: Sequence[memoryview | bytes]) -> torch.Tensor:
    """The `h2o` region's records -> float32 [L, n]."""
    return torch.stack([frombuffer(r, torch.float32) for r in records])
