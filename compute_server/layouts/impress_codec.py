"""The `impress` layout's tensor side (token-level baselines): packing on register, unpacking on load.

Byte order and regions: :mod:`.impress` (pure geometry). Every record of this layout reaches its
policy whole (K-only and V-only blocks, probe keys, token importance), so :meth:`kv_records` is the
base's None and the policies decode blocks with :meth:`ImpressCodec.blocks`, which, like
:meth:`ImpressCodec.token_importance`, takes the compute ``device`` and hands its result over
through :func:`~..kvio.staging.to_device_now` (decoded into pinned memory on CUDA; no copy on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from contiguouskv.compute_server.kvio.staging import host_buffer, to_device_now
from contiguouskv.compute_server.layouts.base import KVGeometry, LayoutCodec, PrefilledPrefix
from contiguouskv.compute_server.layouts.impress import LAYOUT_KIND, ImpressLayout
from contiguouskv.compute_server.layouts.tensors import TORCH_DTYPES, Payload, as_bytes, batches, frombuffer
from contiguouskv.compute_server.selection.importance import window_token_importance


def _blocked(layout: ImpressLayout, x: torch.Tensor) -> torch.Tensor:
    """[heads, n, d] -> [nb, heads, b, d], zero-padding the last block."""
    pad = layout.num_blocks * layout.block_size - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    heads, _, d = x.shape
    return x.reshape(heads, layout.num_blocks, layout.block_size, d).permute(1, 0, 2, 3).contiguous()


def iter_impress_payloads(layout: ImpressLayout, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                          token_importance: torch.Tensor, batch_bytes: int = 1 << 20) -> Iterator[Payload]:
    """Yield (region, first_record, bytes of whole records) covering every region of ``layout``.

    ``keys``/``values``: per layer [kv_heads, n, d] in the layout dtype (post-RoPE keys).
    ``token_importance``: float32 [L, n] static token importance (the `h2o` region).
    """
    if tuple(token_importance.shape) != (layout.num_layers, layout.num_tokens):
        raise ValueError(f"token_importance must be [L, n], got {tuple(token_importance.shape)}")
    probe = list(layout.probe_kv_heads)
    for layer in range(layout.num_layers):
        yield from batches(layout.k_region(layer), layout.block_record_size,
                           as_bytes(_blocked(layout, keys[layer])), batch_bytes)
        yield from batches(layout.v_region(layer), layout.block_record_size,
                           as_bytes(_blocked(layout, values[layer])), batch_bytes)
        yield from batches(layout.probe_region(layer), layout.probe_record_size,
                           as_bytes(_blocked(layout, keys[layer][probe])), batch_bytes)
    yield from batches(layout.importance_region, layout.importance_record_size,
                       as_bytes(token_importance.to(torch.float32)), batch_bytes)


def unpack_blocks(layout: ImpressLayout, records: Sequence[memoryview | bytes], heads: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Block records of ``heads`` heads each -> one tensor [heads, len(records) * b, d] on ``device`` (a copy)."""
    dtype = TORCH_DTYPES[layout.dtype]
    host = host_buffer((heads, len(records) * layout.block_size, layout.head_dim), dtype, device)
    if records:
        blocks = [frombuffer(r, dtype).view(heads, layout.block_size, layout.head_dim) for r in records]
        torch.cat(blocks, dim=1, out=host)  # [heads, blocks * b, d]
    return to_device_now(host, device)


def unpack_token_importance(layout: ImpressLayout, records: Sequence[memoryview | bytes],
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """The `h2o` region's records -> float32 [L, n] on ``device``."""
    host = host_buffer((len(records), layout.num_tokens), torch.float32, device)
    if records:
        torch.stack([frombuffer(r, torch.float32) for r in records], out=host)
    return to_device_now(host, device)


class ImpressCodec(LayoutCodec[ImpressLayout]):
    """A prefix in the `impress` layout: 64-token K and V blocks per layer, probe keys, h2o scores."""

    kind = LAYOUT_KIND

    @classmethod
    def for_prefix(cls, num_tokens: int, model: KVGeometry) -> "ImpressCodec":
        return cls(ImpressLayout(num_tokens, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim,
                                 model.dtype))

    @classmethod
    def from_metadata(cls, raw: bytes) -> tuple["ImpressCodec", dict[str, object]]:
        geometry, extra = ImpressLayout.from_metadata(raw)
        return cls(geometry), extra

    def pack(self, prefix: PrefilledPrefix, batch_bytes: int) -> Iterator[Payload]:
        """Every region; the ``h2o`` region holds the static token importance from the last queries."""
        importance = torch.stack([window_token_importance(q, k, prefix.scaling)
                                  for q, k in zip(prefix.last_queries, prefix.keys)])  # [L, n]
        return iter_impress_payloads(self.geometry, prefix.keys, prefix.values, importance, batch_bytes)

    def blocks(self, records: Sequence[memoryview | bytes], heads: int | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """K, V or probe block records -> ``[heads, len(records) * b, d]`` on ``device`` (``heads``:
        all KV heads unless given, e.g. the probe KV heads)."""
        return unpack_blocks(self.geometry, records, self.geometry.num_kv_heads if heads is None else heads, device)

    def token_importance(self, records: Sequence[memoryview | bytes],
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``h2o`` records of every layer -> float32 ``[L, n]`` on ``device``."""
        return unpack_token_importance(self.geometry, records, device)
