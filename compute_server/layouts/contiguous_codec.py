"""The `contiguous` layout's tensor side: packing on register, unpacking on load.

Byte order and regions: :mod:`.contiguous` (pure geometry). Packing runs once per registered
prefix; unpacking runs per arriving record batch and only makes views over the received bytes.
The decode methods a policy calls (:meth:`ContiguousCodec.chunk_keys`, ``layer_keys``, ``digest``,
``importance``) take the compute ``device`` and hand their result over through
:func:`~..kvio.staging.to_device_now` (decoded into pinned memory on CUDA; no copy on the CPU).
"""

from __future__ import annotations

import math

from collections.abc import Iterator, Sequence

import torch

from contiguouskv.compute_server.kvio.staging import host_buffer, to_device_now
from contiguouskv.compute_server.layouts.base import KVGeometry, KVRecord, KVRef, LayoutCodec, PrefilledPrefix
from contiguouskv.compute_server.layouts.contiguous import LAYOUT_KIND, QUANTIZED_KEYS, ContiguousLayout
from contiguouskv.compute_server.layouts.tensors import TORCH_DTYPES, Payload, as_bytes, batches, frombuffer
from contiguouskv.compute_server.selection.importance import window_importance
from contiguouskv.compute_server.selection.keyquant import PackedKeys, quantize_keys
from contiguouskv.compute_server.workspace import Workspace


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


def chunk_minmax(layout: ContiguousLayout, k: torch.Tensor) -> torch.Tensor:
    """Per-chunk min and max key over the chunk's real tokens, [m, kv_heads, 2, d] in ``k``'s dtype."""
    pad = layout.num_chunks * layout.chunk_size - k.shape[1]
    if pad:  # repeat the last key: min and max of the partial chunk stay those of its real tokens
        k = torch.cat([k, k[:, -1:].expand(k.shape[0], pad, k.shape[2])], dim=1)
    chunked = _chunked(layout, k)  # [m, kv_heads, c, d]
    return torch.stack([chunked.amin(dim=2), chunked.amax(dim=2)], dim=2)


def iter_region_payloads(layout: ContiguousLayout, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                         importance: torch.Tensor, token_ids: Sequence[int],
                         batch_bytes: int = 1 << 20) -> Iterator[Payload]:
    """Yield (region, first_record, bytes of whole records) covering every region of the layout.

    ``keys``/``values``: per layer [kv_heads, n, d] in the layout dtype (post-RoPE keys).
    ``importance``: float32 [L, m] static chunk importance.
    """
    for group in range(layout.num_groups):
        yield from batches(layout.kv_region(group), layout.kv_record_size,
                           as_bytes(pack_kv_group(layout, group, keys, values)), batch_bytes)
    for layer in range(layout.num_layers):
        yield from batches(layout.idkeys_region(layer), layout.token_bytes,
                           as_bytes(_chunked(layout, keys[layer])), batch_bytes)
    for layer in range(layout.num_layers):
        yield layout.digest_region(layer), 0, as_bytes(chunk_digest(layout, keys[layer]))
    for kind, (bits, group, fit) in QUANTIZED_KEYS.items():
        for layer in range(layout.num_layers):
            yield f"{kind}/L{layer}", 0, as_bytes(quantize_keys(keys[layer], bits, group, fit))
    for layer in range(layout.num_layers):
        yield f"minmax/L{layer}", 0, as_bytes(chunk_minmax(layout, keys[layer]))
    if tuple(importance.shape) != (layout.num_layers, layout.num_chunks):
        raise ValueError(f"importance must be [L, m], got {tuple(importance.shape)}")
    yield "stats", 0, as_bytes(importance.to(torch.float32))
    yield "tokens", 0, as_bytes(torch.tensor(list(token_ids), dtype=torch.int64).to(torch.int32))


def unpack_kv_record(layout: ContiguousLayout, payload: memoryview | bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One kv record -> (K, V), each a [kv_heads, c, d] view over ``payload`` (no copy)."""
    t = frombuffer(payload, TORCH_DTYPES[layout.dtype])
    t = t.view(2, layout.num_kv_heads, layout.chunk_size, layout.head_dim)
    return t[0], t[1]


class ContiguousCodec(LayoutCodec[ContiguousLayout]):
    """A prefix in the `contiguous` layout: 16-token ContiguousChunks, K and V of a chunk together."""

    kind = LAYOUT_KIND

    @classmethod
    def for_prefix(cls, num_tokens: int, model: KVGeometry) -> "ContiguousCodec":
        return cls(ContiguousLayout(num_tokens, model.num_layers, model.num_kv_heads, model.head_dim, model.dtype,
                                    model.chunk_size, model.group_size))

    @classmethod
    def from_metadata(cls, raw: bytes) -> tuple["ContiguousCodec", dict[str, object]]:
        geometry, extra = ContiguousLayout.from_metadata(raw)
        return cls(geometry), extra

    # --- save ------------------------------------------------------------------------------------
    def pack(self, prefix: PrefilledPrefix, batch_bytes: int) -> Iterator[Payload]:
        """Every region; the ``stats`` region holds the static chunk importance from the last queries."""
        lay = self.geometry
        importance = torch.stack([window_importance(lay, q, k, prefix.scaling)
                                  for q, k in zip(prefix.last_queries, prefix.keys)])  # [L, m]
        return iter_region_payloads(lay, prefix.keys, prefix.values, importance, prefix.token_ids, batch_bytes)

    # --- load ------------------------------------------------------------------------------------
    def kv_records(self, region: str, indices: Sequence[int], data: memoryview) -> list[KVRecord] | None:
        lay = self.geometry
        group = lay.group_of_region(region)
        if group is None:
            return None
        # One tensor over the whole batch and each record's row in it: no tensor per record. Per-record
        # views (``unbind``) were a third of the compute server's GIL-held samples (docs/performance.md).
        records = frombuffer(data, TORCH_DTYPES[lay.dtype]).view(
            len(indices), 2, lay.num_kv_heads, lay.chunk_size, lay.head_dim)  # [n, K/V, kv_heads, c, d]
        g = lay.layers_in_group(group)
        first = group * lay.group_size
        if indices and not 0 <= min(indices) <= max(indices) < lay.num_chunks * g:
            raise IndexError(f"record index outside kv/G{group} of {lay.num_chunks * g}")
        return [(first + index % g, index // g, records, row) for row, index in enumerate(indices)]

    def kv_requests(self, units: Sequence[int], layers: range) -> dict[str, list[int]]:
        return self.geometry.kv_requests(list(units), layers)

    def gather(self, units: Sequence[int], parts: Sequence[KVRef],
               pin: bool, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.geometry
        shape = (lay.num_kv_heads, len(units) * lay.chunk_size, lay.head_dim)
        if not units:
            return torch.empty(lay.num_kv_heads, 0, lay.head_dim), torch.empty(lay.num_kv_heads, 0, lay.head_dim)
        real = lay.tokens_in(list(units))  # only the prefix's last chunk is partial; it sorts last
        dtype = parts[0][0].dtype
        if out is not None:  # [kv_heads, chunks * c, d] over the buffers' first elements
            numel = math.prod(shape)
            keys, values = out[0][:numel].view(shape), out[1][:numel].view(shape)
        else:
            keys = torch.empty(shape, dtype=dtype, pin_memory=pin)  # [kv_heads, chunks * c, d]
            values = torch.empty(shape, dtype=dtype, pin_memory=pin)
        by_unit = (lay.num_kv_heads, len(units), lay.chunk_size, lay.head_dim)
        k4, v4 = keys.view(by_unit), values.view(by_unit)
        for start, stop, batch, row, step in ref_runs(parts):  # one strided copy per run of rows
            src = batch[row : row + (stop - start - 1) * step + 1 : step]  # [n, K/V, kv_heads, c, d]
            k4[:, start:stop].copy_(src[:, 0].transpose(0, 1))
            v4[:, start:stop].copy_(src[:, 1].transpose(0, 1))
        return keys[:, :real], values[:, :real]

    def chunk_keys(self, records: Sequence[memoryview | bytes], device: torch.device | str = "cpu",
                   scratch: Workspace | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``idkeys`` records of some chunks -> their keys ``[kv_heads, len * c, d]`` on ``device`` (a copy).

        With ``scratch`` on the CPU the keys land in its ``dtype`` buffer ``idkeys`` (valid until the
        next call with the same scratch), converted in the same copy to what the scorer multiplies
        in, and a fresh prefix-sized tensor per call costs its page faults (docs/performance.md).
        Without it they keep the stored dtype (the scorer converts what it must)."""
        lay = self.geometry
        stored = TORCH_DTYPES[lay.dtype]
        shape = (lay.num_kv_heads, len(records) * lay.chunk_size, lay.head_dim)
        if scratch is not None and torch.device(device).type == "cpu":
            host = scratch.get("idkeys", shape, torch.device("cpu"), dtype)
        else:
            host = host_buffer(shape, stored, device)
        if records:
            torch.cat([frombuffer(r, stored).view(lay.num_kv_heads, lay.chunk_size, lay.head_dim)
                       for r in records], dim=1, out=host)
        return to_device_now(host, device)

    def layer_keys(self, records: Sequence[memoryview | bytes], device: torch.device | str = "cpu",
                   scratch: Workspace | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All ``idkeys`` records of a layer -> every prefix key ``[kv_heads, n, d]`` on ``device``
        (into ``scratch`` as :meth:`chunk_keys` says)."""
        return self.chunk_keys(records, device, scratch, dtype)[:, : self.geometry.num_tokens]

    def digest(self, record: memoryview | bytes, device: torch.device | str = "cpu") -> torch.Tensor:
        """A ``digest`` record -> mean key per chunk and KV head, float32 ``[m, kv_heads, d]`` on
        ``device`` (on the CPU: a read-only view over ``record``)."""
        lay = self.geometry
        view = frombuffer(record, torch.float32).view(lay.num_chunks, lay.num_kv_heads, lay.head_dim)
        return to_device_now(view, device)

    def packed_qkeys(self, record: memoryview | bytes, device: torch.device | str = "cpu",
                     kind: str = "qkeys") -> PackedKeys:
        """A quantised key record (``qkeys``, ``qkeys1``) parsed on ``device`` (the packed bytes
        cross to it), for :func:`~..selection.chunks.packed_chunk_scores` to decode tile by tile."""
        lay = self.geometry
        bits, group, _ = QUANTIZED_KEYS[kind]
        packed = to_device_now(frombuffer(record, torch.uint8), device)
        if packed.device.type == "cpu":  # a view at whatever alignment the bytes arrived with: the
            packed = packed.clone()      # unpacking ran 2-6x slower on it than on torch's aligned copy
        return PackedKeys(packed, lay.num_tokens, lay.num_kv_heads, lay.head_dim, bits, group)

    def minmax(self, record: memoryview | bytes, device: torch.device | str = "cpu") -> torch.Tensor:
        """A ``minmax`` record -> per-chunk min and max key ``[m, kv_heads, 2, d]`` on ``device``."""
        lay = self.geometry
        view = frombuffer(record, TORCH_DTYPES[lay.dtype]).view(lay.num_chunks, lay.num_kv_heads, 2, lay.head_dim)
        return to_device_now(view, device)

    def importance(self, record: memoryview | bytes, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``stats`` record -> static chunk importance, float32 ``[L, m]`` on ``device`` (on the
        CPU: a read-only view over ``record``)."""
        lay = self.geometry
        return to_device_now(frombuffer(record, torch.float32).view(lay.num_layers, lay.num_chunks), device)

    @staticmethod
    def tokens(record: memoryview | bytes) -> list[int]:
        """The ``tokens`` record -> the prefix's token ids."""
        return frombuffer(record, torch.int32).tolist()


def ref_runs(parts: Sequence[KVRef]) -> Iterator[tuple[int, int, torch.Tensor, int, int]]:
    """``parts`` cut into runs ``(start, stop, batch, row, step)``: ``parts[start:stop]`` are rows
    ``row, row + step, ...`` of one batch (one strided view). The records of one layer in a batch
    are every ``sub_period``-th row, so a layer's records from one batch are usually one run."""
    start = 0
    while start < len(parts):
        batch, row = parts[start]
        stop, step = start + 1, 1
        if stop < len(parts) and parts[stop][0] is batch and parts[stop][1] > row:
            step = parts[stop][1] - row
            while stop < len(parts) and parts[stop][0] is batch and parts[stop][1] == row + (stop - start) * step:
                stop += 1
        yield start, stop, batch, row, step
        start = stop
