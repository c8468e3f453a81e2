"""The `impress` on-disk layout of the token-level baselines (docs/baselines.md): pure int math.

IMPRESS stores each layer's keys and values as separate objects of 64-token blocks, plus a second
copy of the probe heads' keys so that identification reads only those. The `h2o` baseline reads the
same K/V blocks and keeps its registration-time token importance here too. A prefix of ``n`` tokens
has ``nb = ceil(n / b)`` blocks (``b = 64`` by default):

================  ==========  ===============================================================
region            records     one record holds
================  ==========  ===============================================================
``k/L{l}``        nb          K of one block at layer l, ``[kv_heads, b, head_dim]``
``v/L{l}``        nb          V of one block at layer l, ``[kv_heads, b, head_dim]``
``probe/L{l}``    nb          K of the probe KV heads of one block, ``[probe_kv, b, head_dim]``
``h2o``           L           static token importance of layer l, float32 ``[n]``
================  ==========  ===============================================================

The last block may hold fewer than ``b`` tokens; its records are zero-padded. The probe heads are
the first ``probe_heads`` (3) *attention* heads; under grouped-query attention they read the KV
heads ``h // (heads / kv_heads)``, and only those KV heads' keys are duplicated (one KV head for
Qwen2.5-7B/14B, all of them for an MHA model with 4 heads).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from contiguouskv.compute_server.layouts.region import DTYPE_BYTES, Region, ceil_div

IMPRESS_LAYOUT_VERSION = 1
LAYOUT_KIND = "impress"
_GEOMETRY = ("num_tokens", "num_layers", "num_heads", "num_kv_heads", "head_dim", "dtype", "block_size",
             "probe_heads")


@dataclass(frozen=True)
class ImpressLayout:
    """Geometry of one stored prefix in the `impress` layout; every size derives from it."""

    num_tokens: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int = 64
    probe_heads: int = 3
    num_blocks: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_layers", "num_heads", "num_kv_heads", "head_dim", "block_size",
                     "probe_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        object.__setattr__(self, "num_blocks", ceil_div(self.num_tokens, self.block_size))

    @property
    def name(self) -> str:
        """The layout key the cache server stores this object under."""
        return f"impress-b{self.block_size}-p{self.probe_heads}"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # --- heads -------------------------------------------------------------------------------
    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def probe_query_heads(self) -> range:
        """The probe heads: the first ``probe_heads`` attention heads (all of them if fewer)."""
        return range(min(self.probe_heads, self.num_heads))

    @property
    def probe_kv_heads(self) -> tuple[int, ...]:
        """KV heads whose keys the probe heads read, ascending: the heads of a ``probe`` record."""
        return tuple(sorted({h // self.group for h in self.probe_query_heads}))

    # --- tokens and blocks -------------------------------------------------------------------
    def block_tokens(self, block: int) -> tuple[int, int]:
        """Token range [start, end) of a block."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} outside [0, {self.num_blocks})")
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_tokens)

    def block_of(self, token: int) -> int:
        if not 0 <= token < self.num_tokens:
            raise IndexError(f"token {token} outside [0, {self.num_tokens})")
        return token // self.block_size

    def blocks_holding(self, tokens: Iterable[int]) -> list[int]:
        """Distinct blocks holding these tokens, ascending: what a token selection must read."""
        return sorted({self.block_of(t) for t in tokens})

    def tokens_in(self, blocks: Iterable[int]) -> int:
        """Real (unpadded) tokens of distinct blocks."""
        return sum(e - s for s, e in map(self.block_tokens, set(blocks)))

    # --- sizes -------------------------------------------------------------------------------
    @property
    def token_bytes(self) -> int:
        """Bytes of K (or of V) of one token at one layer, all KV heads."""
        return self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def block_record_size(self) -> int:
        """One ``k/`` or ``v/`` record: one block's K (or V), all KV heads, padded tokens included."""
        return self.block_size * self.token_bytes

    @property
    def probe_record_size(self) -> int:
        return len(self.probe_kv_heads) * self.block_size * self.head_dim * self.dtype_bytes

    @property
    def importance_record_size(self) -> int:
        return self.num_tokens * 4

    def selected_bytes(self, tokens_per_kv_head: int) -> int:
        """Bytes of K and V that a layer attends to when each KV head keeps that many tokens."""
        return 2 * tokens_per_kv_head * self.token_bytes

    # --- regions -----------------------------------------------------------------------------
    def k_region(self, layer: int) -> str:
        self._check_layer(layer)
        return f"k/L{layer}"

    def v_region(self, layer: int) -> str:
        self._check_layer(layer)
        return f"v/L{layer}"

    def probe_region(self, layer: int) -> str:
        self._check_layer(layer)
        return f"probe/L{layer}"

    importance_region = "h2o"

    def regions(self) -> list[Region]:
        """Every region of this layout, in file order (per layer: K, V, probe keys; then h2o)."""
        out: list[Region] = []
        for layer in range(self.num_layers):
            out.append(Region(self.k_region(layer), self.num_blocks, self.block_record_size))
            out.append(Region(self.v_region(layer), self.num_blocks, self.block_record_size))
            out.append(Region(self.probe_region(layer), self.num_blocks, self.probe_record_size))
        out.append(Region(self.importance_region, self.num_layers, self.importance_record_size))
        return out

    def total_kv_bytes(self) -> int:
        """Bytes of every K and V record."""
        return 2 * self.num_layers * self.num_blocks * self.block_record_size

    # --- metadata ----------------------------------------------------------------------------
    def to_metadata(self, **extra: object) -> bytes:
        """JSON metadata stored with the object (the cache server treats it as opaque)."""
        data = {k: v for k, v in asdict(self).items() if k != "num_blocks"}
        data.update(version=IMPRESS_LAYOUT_VERSION, layout=LAYOUT_KIND, **extra)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_metadata(cls, raw: bytes) -> tuple["ImpressLayout", dict[str, object]]:
        """Parse metadata into the layout and the remaining fields (model fingerprint, ...)."""
        data = json.loads(raw)
        if data.get("layout") != LAYOUT_KIND or data.get("version") != IMPRESS_LAYOUT_VERSION:
            raise ValueError(f"unsupported layout metadata: {data.get('layout')} v{data.get('version')}")
        layout = cls(**{k: data.pop(k) for k in _GEOMETRY})
        return layout, data

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.num_layers})")


def token_budget(budget: float, num_tokens: int) -> int:
    """Tokens a budget keeps per layer (and per KV head): ceil(budget x n), at least one."""
    return min(num_tokens, max(1, math.ceil(budget * num_tokens - 1e-9)))  # 1e-9: 0.1 x 30 is 3
