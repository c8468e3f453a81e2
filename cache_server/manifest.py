"""Manifest of a stored object and the pure layout math of its data file.

Regions are laid out one after another in header order. Every record of a region occupies
``stride = roundup(record_size, 4096)`` bytes, so every record (and every run of adjacent records)
starts and ends on a 4 KiB boundary and can be read with O_DIRECT. The manifest records each
region's offset and stride, one CRC-32 (``zlib.crc32``) per record payload, the writer's opaque
metadata, sizes and the commit time. It is stored as JSON next to the data file.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from collections.abc import Iterable, Mapping

from contiguouskv.cache_server.errors import InvalidArgument
from contiguouskv.cache_server.keys import ObjectKey, check_region_name

ALIGN = 4096
MAX_RECORDS = 1 << 24  # per object; bounds the writer's bookkeeping for any header
MANIFEST_VERSION = 1
_CRC = struct.Struct("<I")


def stride_of(record_size: int) -> int:
    """Bytes one record occupies on disk: ``record_size`` rounded up to a multiple of 4096."""
    return -(-record_size // ALIGN) * ALIGN


@dataclasses.dataclass(frozen=True, slots=True)
class RegionLayout:
    """Where one region sits in the data file: ``num_records`` records of ``record_size`` bytes."""

    name: str
    num_records: int
    record_size: int
    offset: int

    @property
    def stride(self) -> int:
        return stride_of(self.record_size)

    @property
    def size(self) -> int:
        """Bytes the region occupies in the data file (padding included)."""
        return self.num_records * self.stride

    def record_offset(self, index: int) -> int:
        """File offset of record ``index`` (the caller checked ``0 <= index < num_records``)."""
        return self.offset + index * self.stride

    def check_index(self, index: int) -> None:
        """Raise ``InvalidArgument`` naming the index unless it is in ``0..num_records-1``."""
        if not 0 <= index < self.num_records:
            raise InvalidArgument(
                f"index {index} is out of range for region {self.name!r} "
                f"({self.num_records} records)"
            )


def plan_regions(
    specs: Iterable[tuple[str, int, int]], max_record_bytes: int
) -> dict[str, RegionLayout]:
    """Lay out regions given as ``(name, num_records, record_size)``, in order, from offset 0.

    Raises ``InvalidArgument`` for a bad or repeated name, a record size outside
    ``1..max_record_bytes``, a negative record count or more than ``MAX_RECORDS`` records in all.
    """
    regions: dict[str, RegionLayout] = {}
    offset = 0
    for name, num_records, record_size in specs:
        check_region_name(name)
        if name in regions:
            raise InvalidArgument(f"regions.name: region {name!r} appears twice")
        if not 1 <= record_size <= max_record_bytes:
            raise InvalidArgument(
                f"regions.record_size: {record_size} of region {name!r} is outside "
                f"1..{max_record_bytes}"
            )
        if num_records < 0:
            raise InvalidArgument(f"regions.num_records: {num_records} of region {name!r} < 0")
        regions[name] = RegionLayout(name, num_records, record_size, offset)
        offset += regions[name].size
    total = sum(r.num_records for r in regions.values())
    if total > MAX_RECORDS:
        raise InvalidArgument(f"regions.num_records: {total} records in all, more than {MAX_RECORDS}")
    return regions


def data_size(regions: Mapping[str, RegionLayout]) -> int:
    """Size of the data file holding ``regions`` (padding included)."""
    return sum(r.size for r in regions.values())


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Manifest:
    """A committed object: its key, regions, per-record checksums, metadata and commit time.

    ``checksums[name]`` packs one little-endian uint32 CRC-32 per record of the region.
    ``data_bytes`` is the size of the data file, padding included.
    """

    key: ObjectKey
    regions: Mapping[str, RegionLayout]
    checksums: Mapping[str, bytes]
    metadata: bytes
    committed_at: float

    @property
    def data_bytes(self) -> int:
        return data_size(self.regions)

    @property
    def payload_bytes(self) -> int:
        """Bytes of record payloads, padding excluded."""
        return sum(r.num_records * r.record_size for r in self.regions.values())

    def region(self, name: str) -> RegionLayout:
        """The region called ``name``; ``InvalidArgument`` naming it if there is none."""
        layout = self.regions.get(name)
        if layout is None:
            raise InvalidArgument(f"region {name!r} is not in object {self.key}")
        return layout

    def checksum(self, region: str, index: int) -> int:
        """Stored CRC-32 of record ``index`` of ``region``."""
        value: int = _CRC.unpack_from(self.checksums[region], index * _CRC.size)[0]
        return value

    def same_regions(self, other: Mapping[str, RegionLayout]) -> bool:
        """Whether ``other`` lays out the same regions (names, counts, sizes, order)."""
        return list(self.regions.values()) == list(other.values())

    def to_json(self) -> bytes:
        doc = {
            "version": MANIFEST_VERSION,
            "prefix_id": self.key.prefix_id,
            "layout": self.key.layout,
            "regions": [
                {
                    "name": r.name,
                    "num_records": r.num_records,
                    "record_size": r.record_size,
                    "offset": r.offset,
                    "stride": r.stride,
                    "crc32": base64.b64encode(self.checksums[r.name]).decode("ascii"),
                }
                for r in self.regions.values()
            ],
            "metadata": base64.b64encode(self.metadata).decode("ascii"),
            "data_bytes": self.data_bytes,
            "payload_bytes": self.payload_bytes,
            "committed_at": self.committed_at,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and check a stored manifest; ``ValueError`` if it is malformed or inconsistent."""
        try:
            doc = json.loads(raw)
            if doc["version"] != MANIFEST_VERSION:
                raise ValueError(f"unknown manifest version {doc['version']!r}")
            key = ObjectKey(doc["prefix_id"], doc["layout"])
            specs = [(r["name"], r["num_records"], r["record_size"]) for r in doc["regions"]]
            regions = plan_regions(specs, max_record_bytes=1 << 62)
            checksums = {}
            for stored, layout in zip(doc["regions"], regions.values()):
                if (stored["offset"], stored["stride"]) != (layout.offset, layout.stride):
                    raise ValueError(f"region {layout.name!r}: offset or stride disagrees")
                crcs = base64.b64decode(stored["crc32"], validate=True)
                if len(crcs) != layout.num_records * _CRC.size:
                    raise ValueError(f"region {layout.name!r}: wrong number of checksums")
                checksums[layout.name] = crcs
            manifest = cls(
                key=key,
                regions=regions,
                checksums=checksums,
                metadata=base64.b64decode(doc["metadata"], validate=True),
                committed_at=float(doc["committed_at"]),
            )
            if doc["data_bytes"] != manifest.data_bytes:
                raise ValueError("data_bytes disagrees with the regions")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed manifest: {exc}") from exc
        return manifest


def pack_checksums(crcs: Iterable[int]) -> bytes:
    """Pack CRC-32 values in the manifest's layout."""
    return b"".join(_CRC.pack(c) for c in crcs)
