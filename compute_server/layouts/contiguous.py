"""The `contiguous` on-disk layout: pure arithmetic over ints, no I/O, no torch (docs/reprefill.md).

A prefix of ``n`` tokens is cut into ``m = ceil(n / c)`` ContiguousChunks. Layers are grouped into
storage groups of ``g`` layers. The cache server sees only named regions of fixed-size records:

===============  =================  ==========================================================
region           records            one record holds
===============  =================  ==========================================================
``kv/G{i}``      m x g_i            K then V of one chunk at one layer of group i, each
                                    ``[kv_heads, c, head_dim]``; chunk-major: record
                                    ``j * g_i + k`` = chunk j, layer ``i * g + k``
``idkeys/L{l}``  m                  K of one chunk at layer l, ``[kv_heads, c, head_dim]``
``digest/L{l}``  1                  mean key per chunk and KV head, float32 ``[m, kv_heads, d]``
``qkeys/L{l}``   1                  K of layer l quantised to ``QKEY_BITS`` bits per value with a
                                    float16 (min, step) per KV head and channel over groups of
                                    ``QKEY_GROUP`` tokens (:mod:`..selection.keyquant`): 7.8 % of
                                    the layer's K+V at 2 bits
``qkeys1/L{l}``  1                  the same at 1 bit over 128-token groups, levels fitted by least
                                    squares (``lloyd``): 3.9 % of the layer's K+V in bf16
``minmax/L{l}``  1                  per-chunk min and max key (Quest), layout dtype ``[m, kv_heads, 2, d]``
``stats``        1                  static chunk importance, float32 ``[L, m]``
``tokens``       1                  the prefix token ids, int32 ``[n]``
===============  =================  ==========================================================

The last chunk may hold fewer than ``c`` tokens; its records are zero-padded to full size. Because
a group is chunk-major, the records of one chunk for a run of layers (a sub-period) are adjacent and
are read with one coalesced request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from contiguouskv.compute_server.layouts.region import DTYPE_BYTES, Region, ceil_div

LAYOUT_VERSION = 2  # v2 added the qkeys and minmax identification regions
LAYOUT_KIND = "contiguous"
QKEY_BITS = 2
"""Bits per quantised identification key value (see the ``qkeys`` region)."""
QKEY_GROUP = 64
"""Tokens sharing one (min, step) pair per KV head and channel in the ``qkeys`` region."""
QUANTIZED_KEYS = {"qkeys": (QKEY_BITS, QKEY_GROUP, "minmax"), "qkeys1": (1, 128, "lloyd")}
"""Quantised identification key regions: (bits, group tokens, level fit) of each."""


@dataclass(frozen=True)
class ContiguousLayout:
    """Geometry of one stored prefix in the `contiguous` layout; every size derives from it."""

    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_size: int = 16
    group_size: int = 8
    num_chunks: int = field(init=False)
    num_groups: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_layers", "num_kv_heads", "head_dim", "chunk_size", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        object.__setattr__(self, "num_chunks", ceil_div(self.num_tokens, self.chunk_size))
        object.__setattr__(self, "num_groups", ceil_div(self.num_layers, self.group_size))

    @property
    def name(self) -> str:
        """The layout key the cache server stores this object under."""
        return f"contiguous-c{self.chunk_size}-g{self.group_size}"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # --- tokens and chunks -------------------------------------------------------------------
    def chunk_tokens(self, chunk: int) -> tuple[int, int]:
        """Token range [start, end) of a chunk."""
        self._check_chunk(chunk)
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_tokens)

    def chunk_of_token(self, token: int) -> int:
        if not 0 <= token < self.num_tokens:
            raise IndexError(f"token {token} outside [0, {self.num_tokens})")
        return token // self.chunk_size

    def tokens_in(self, chunks: list[int] | tuple[int, ...]) -> int:
        """Number of real (unpadded) tokens covered by distinct chunks."""
        return sum(end - start for start, end in (self.chunk_tokens(j) for j in set(chunks)))

    # --- groups and kv records ---------------------------------------------------------------
    def group_of(self, layer: int) -> tuple[int, int]:
        """(group, position of the layer inside the group)."""
        self._check_layer(layer)
        return layer // self.group_size, layer % self.group_size

    def layers_in_group(self, group: int) -> int:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"group {group} outside [0, {self.num_groups})")
        return min(self.group_size, self.num_layers - group * self.group_size)

    @property
    def token_bytes(self) -> int:
        """Bytes of K (or of V) for one chunk-slot at one layer: kv_heads x c x head_dim."""
        return self.num_kv_heads * self.chunk_size * self.head_dim * self.dtype_bytes

    @property
    def kv_record_size(self) -> int:
        return 2 * self.token_bytes

    def kv_region(self, group: int) -> str:
        return f"kv/G{group}"

    def kv_record(self, chunk: int, layer: int) -> tuple[str, int]:
        """(region, record index) holding K and V of ``chunk`` at ``layer``."""
        self._check_chunk(chunk)
        group, k = self.group_of(layer)
        return self.kv_region(group), chunk * self.layers_in_group(group) + k

    def kv_records_at(self, chunks: Sequence[int], layer: int) -> tuple[str, list[int]]:
        """(region, record indices) holding K and V of ``chunks`` at ``layer``: :meth:`kv_record` for
        many chunks of one layer at once (they share the region)."""
        for chunk in (min(chunks), max(chunks)) if chunks else ():
            self._check_chunk(chunk)
        group, k = self.group_of(layer)
        g = self.layers_in_group(group)
        return self.kv_region(group), [chunk * g + k for chunk in chunks]

    def kv_record_owner(self, group: int, index: int) -> tuple[int, int]:
        """Inverse of :meth:`kv_record`: (chunk, layer) of a record of ``kv/G{group}``."""
        g = self.layers_in_group(group)
        if not 0 <= index < self.num_chunks * g:
            raise IndexError(f"record {index} outside kv/G{group} of {self.num_chunks * g}")
        return index // g, group * self.group_size + index % g

    def kv_requests(self, chunks: list[int] | tuple[int, ...], layers: range) -> dict[str, list[int]]:
        """Record indices per kv region for these chunks at these layers, chunk-major.

        Layers of one group come out adjacent per chunk, so the cache server reads each chunk's
        run of layers with one coalesced read.
        """
        out: dict[str, list[int]] = {}
        for layer in layers:
            self._check_layer(layer)
        for chunk in sorted(set(chunks)):
            for layer in layers:
                region, index = self.kv_record(chunk, layer)
                out.setdefault(region, []).append(index)
        return out

    def group_of_region(self, region: str) -> int | None:
        """The group of a ``kv/G{i}`` region name; None for any other region."""
        if not region.startswith("kv/G") or not region[4:].isdigit():
            return None
        group = int(region[4:])
        return group if group < self.num_groups else None

    # --- identification, digest, stats, tokens -----------------------------------------------
    def idkeys_region(self, layer: int) -> str:
        self._check_layer(layer)
        return f"idkeys/L{layer}"

    def digest_region(self, layer: int) -> str:
        self._check_layer(layer)
        return f"digest/L{layer}"

    @property
    def digest_record_size(self) -> int:
        return self.num_chunks * self.num_kv_heads * self.head_dim * 4

    def quantized_record_size(self, kind: str = "qkeys") -> int:
        """One record of a quantised key region (:data:`QUANTIZED_KEYS`): float16 (min, step) then
        the packed codes, per token group, KV head and channel."""
        bits, group, _ = QUANTIZED_KEYS[kind]
        per_channel = 2 * 2 + group * bits // 8
        return ceil_div(self.num_tokens, group) * self.num_kv_heads * self.head_dim * per_channel

    @property
    def qkeys_record_size(self) -> int:
        return self.quantized_record_size("qkeys")

    @property
    def minmax_record_size(self) -> int:
        """One ``minmax`` record: a min and a max key per chunk and KV head, in the layout dtype."""
        return self.num_chunks * self.num_kv_heads * 2 * self.head_dim * self.dtype_bytes

    def ident_record_size(self, kind: str) -> int:
        """Bytes of one layer's identification data of ``kind`` read whole: ``idkeys`` (every
        key), ``digest``, ``qkeys`` or ``minmax``."""
        sizes = {"idkeys": self.num_chunks * self.token_bytes, "digest": self.digest_record_size,
                 "minmax": self.minmax_record_size, **{q: self.quantized_record_size(q) for q in QUANTIZED_KEYS}}
        if kind not in sizes:
            raise ValueError(f"unknown identification region {kind!r}; one of {sorted(sizes)}")
        return sizes[kind]

    def regions(self) -> list[Region]:
        """Every region of this layout, in file order."""
        out = [
            Region(self.kv_region(i), self.num_chunks * self.layers_in_group(i), self.kv_record_size)
            for i in range(self.num_groups)
        ]
        out += [Region(f"idkeys/L{l}", self.num_chunks, self.token_bytes) for l in range(self.num_layers)]
        out += [Region(f"digest/L{l}", 1, self.digest_record_size) for l in range(self.num_layers)]
        for kind in QUANTIZED_KEYS:
            out += [Region(f"{kind}/L{l}", 1, self.quantized_record_size(kind)) for l in range(self.num_layers)]
        out += [Region(f"minmax/L{l}", 1, self.minmax_record_size) for l in range(self.num_layers)]
        out.append(Region("stats", 1, self.num_layers * self.num_chunks * 4))
        out.append(Region("tokens", 1, self.num_tokens * 4))
        return out

    def total_kv_bytes(self) -> int:
        """Bytes of all kv records: what the `full` policy reads."""
        return self.num_chunks * self.num_layers * self.kv_record_size

    # --- metadata ----------------------------------------------------------------------------
    def to_metadata(self, **extra: object) -> bytes:
        """JSON metadata stored with the object (the cache server treats it as opaque)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("num_chunks", "num_groups")}
        data.update(version=LAYOUT_VERSION, layout=LAYOUT_KIND, **extra)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_metadata(cls, raw: bytes) -> tuple["ContiguousLayout", dict[str, object]]:
        """Parse metadata into the layout and the remaining fields (model fingerprint, ...)."""
        data = json.loads(raw)
        if data.get("layout") != LAYOUT_KIND or data.get("version") != LAYOUT_VERSION:
            raise ValueError(f"unsupported layout metadata: {data.get('layout')} v{data.get('version')}")
        keys = ("num_tokens", "num_layers", "num_kv_heads", "head_dim", "dtype", "chunk_size", "group_size")
        layout = cls(**{k: data.pop(k) for k in keys})
        return layout, data

    def _check_chunk(self, chunk: int) -> None:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} outside [0, {self.num_chunks})")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.num_layers})")


def sub_periods(num_layers: int, period: int, sub_period: int) -> list[range]:
    """Split layers into periods of ``period`` layers and those into runs of ``sub_period``."""
    if period < 1 or sub_period < 1:
        raise ValueError(f"period and sub_period must be >= 1, got {period} and {sub_period}")
    if sub_period > period:
        raise ValueError(f"sub_period ({sub_period}) must not exceed period ({period})")
    out = []
    for p0 in range(0, num_layers, period):
        p1 = min(p0 + period, num_layers)
        out += [range(s, min(s + sub_period, p1)) for s in range(p0, p1, sub_period)]
    return out
