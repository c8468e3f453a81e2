"""A stored layout as one interface: both directions of how a prefix's KV lives in the cache.

Saving and loading are a pair, as ``save_kv_layer`` / ``start_load_kv`` are in vLLM's KV connector:

- :meth:`LayoutCodec.pack` (register, compute thread) turns a prefilled prefix into the layout's
  records: the payloads of one ``PutPrefix`` object named :attr:`LayoutCodec.name`.
- :meth:`LayoutCodec.kv_records` (load, event loop) turns one arriving Fetch batch into
  ``(layer, unit, batch view, row)`` references when the batch holds K/V records the loader files per layer, or
  returns None when it holds whole records the requester decodes itself (identification keys,
  digests, statistics, K-only or V-only blocks): those reach the requester as bytes. The loader
  therefore never parses a region name.

Each codec wraps a pure geometry (:mod:`.contiguous`, :mod:`.impress`: sizes, regions and record
indices as int math, no torch) and adds the tensor side. Codecs are chosen by kind through
:func:`contiguouskv.compute_server.layouts.registry.build_codec`; a loading policy names the kind it
reads (``LoadingPolicy.layout``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

import torch

from contiguouskv.compute_server.layouts.region import Region
from contiguouskv.compute_server.layouts.tensors import Payload

KVRef = tuple[torch.Tensor, int]
"""Where one arrived K/V record lies: ``(batch, row)``, ``batch`` a ``[records, 2, kv_heads, unit
tokens, head_dim]`` view over one Fetch batch's received bytes (K at ``[row, 0]``, V at
``[row, 1]``). By reference, not one K and one V tensor per record: making 2 Python tensors per
record on the event loop was the largest holder of the GIL in the compute server (a third of the
GIL-held samples of a ``full`` run over shared memory; docs/performance.md)."""

KVRecord = tuple[int, int, torch.Tensor, int]
"""(layer, unit, batch, row): one arrived K/V record (see :data:`KVRef`); the unit is the layout's
(a chunk for `contiguous`)."""


@dataclass(frozen=True)
class KVGeometry:
    """The model and server facts a layout derives its sizes from."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_size: int = 16
    group_size: int = 8


@dataclass(frozen=True)
class PrefilledPrefix:
    """What registration computed once, for every layout to pack.

    ``keys``/``values``: per layer ``[kv_heads, n, head_dim]`` on the CPU in the storage dtype
    (keys post-RoPE); ``last_queries``: per layer the post-RoPE queries ``[heads, w, head_dim]`` of
    the last ``w`` prefix tokens (for the layouts' static importance); ``scaling``: the attention scale.
    """

    token_ids: Sequence[int]
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    last_queries: Sequence[torch.Tensor]
    scaling: float


class Geometry(Protocol):
    """The pure side of a layout (int math only): what the codec delegates to."""

    @property
    def name(self) -> str: ...

    @property
    def num_tokens(self) -> int: ...

    def regions(self) -> list[Region]: ...

    def to_metadata(self, **extra: object) -> bytes: ...

    def total_kv_bytes(self) -> int: ...


G = TypeVar("G", bound=Geometry)


class LayoutCodec(abc.ABC, Generic[G]):
    """One prefix stored in one layout: its geometry, and packing and unpacking of its records.

    Equal codecs have the same kind and geometry; sizes, regions and metadata come from the geometry.
    """

    kind: ClassVar[str]
    """The layout's kind (``contiguous``, ``impress``): what policies and registrations name."""

    def __init__(self, geometry: G) -> None:
        self.geometry = geometry

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.geometry == self.geometry  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.geometry))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.geometry})"

    @classmethod
    @abc.abstractmethod
    def for_prefix(cls, num_tokens: int, model: KVGeometry) -> "LayoutCodec":
        """The codec of a prefix of ``num_tokens`` tokens of a model of this geometry."""

    @classmethod
    @abc.abstractmethod
    def from_metadata(cls, raw: bytes) -> "tuple[LayoutCodec, dict[str, object]]":
        """The codec of a stored object from its metadata, and the metadata's other fields;
        ValueError (or KeyError, TypeError) when the metadata is not this layout's."""

    @property
    def name(self) -> str:
        """The key the cache server stores the object under (kind plus its parameters)."""
        return self.geometry.name

    @property
    def num_tokens(self) -> int:
        """Prefix tokens stored."""
        return self.geometry.num_tokens

    def regions(self) -> list[Region]:
        """Every region of the object, in file order."""
        return self.geometry.regions()

    def to_metadata(self, **extra: object) -> bytes:
        """Opaque JSON stored with the object: the geometry plus ``extra`` (model fingerprint, ...)."""
        return self.geometry.to_metadata(**extra)

    def total_kv_bytes(self) -> int:
        """Bytes of every K/V record: what loading everything reads."""
        return self.geometry.total_kv_bytes()

    @abc.abstractmethod
    def pack(self, prefix: PrefilledPrefix, batch_bytes: int) -> Iterator[Payload]:
        """Save direction: the object's payloads (every region, whole records, ~``batch_bytes`` each).

        Called on the compute thread at registration; may compute the layout's own statistics.
        """

    def kv_requests(self, units: Sequence[int], layers: range) -> dict[str, list[int]]:
        """Load direction: record indices per region holding K/V of ``units`` at ``layers``, in the
        order to ask for them. Layouts whose K/V reach policies only as whole records have none."""
        raise ValueError(f"layout {self.name}: no per-layer K/V records to request by unit")

    def gather(self, units: Sequence[int], parts: Sequence[KVRef],
               pin: bool, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``units`` (ascending) from their arrived records ``parts`` (as :meth:`kv_records`
        gave them): ``[kv_heads, real tokens, head_dim]`` each, padding cut; one copy, into pinned
        host memory when ``pin``, or into the first elements of the flat buffers ``out`` (each of at
        least the records' elements, of their dtype) when given."""
        raise ValueError(f"layout {self.name}: no per-layer K/V records to gather")

    def kv_records(self, region: str, indices: Sequence[int], data: memoryview) -> list[KVRecord] | None:
        """Load direction: the K/V records of one Fetch batch, or None when ``region`` holds none.

        Called on the event loop for every arriving batch; returns one view over the batch and each
        record's row in it, never copies, and no tensor per record.
        """
        return None
