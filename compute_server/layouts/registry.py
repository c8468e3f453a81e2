"""Stored layouts by kind: the one place a layout kind becomes a codec.

Adding a layout = one codec module (geometry + :class:`~.base.LayoutCodec`) + one line in
:data:`LAYOUT_CODECS`.
"""

from __future__ import annotations

from types import MappingProxyType

from contiguouskv.compute_server.layouts.base import KVGeometry, LayoutCodec
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.compute_server.layouts.impress_codec import ImpressCodec

LAYOUT_CODECS = MappingProxyType({codec.kind: codec for codec in (ContiguousCodec, ImpressCodec)})
PRIMARY_LAYOUT = ContiguousCodec.kind
"""Stored for every prefix: its metadata names the model and geometry every other layout follows."""


def layout_kinds() -> tuple[str, ...]:
    return tuple(LAYOUT_CODECS)


def build_codec(kind: str, num_tokens: int, model: KVGeometry) -> LayoutCodec:
    """The codec of a prefix of ``num_tokens`` tokens stored in layout ``kind``."""
    if kind not in LAYOUT_CODECS:
        raise ValueError(f"unknown layout {kind[:40]!r}; known: {', '.join(LAYOUT_CODECS)}")
    return LAYOUT_CODECS[kind].for_prefix(num_tokens, model)


def parse_codec(kind: str, metadata: bytes) -> tuple[LayoutCodec, dict[str, object]]:
    """The codec of a stored object of layout ``kind`` from its metadata, and the metadata's other fields."""
    return LAYOUT_CODECS[kind].from_metadata(metadata)
