"""Eviction policies of the DRAM cache: what a record is worth keeping, as a sortable priority.

A policy maps a record's :class:`RecordStats` to a priority tuple; the cache evicts the record of
lowest priority first (a min-heap) and admits a new record only if it outranks the record it would
evict. Every priority ends with the record's last access (a sequence number), so ties go to the
most recently used record, and a record nobody reported on is still cached while there is room.

- ``attention`` (default, ContiguousKV): accumulated attention × access frequency.
- ``lru``: last access.
- ``lfu``: access frequency.
- ``impress`` (the IMPRESS baseline): access frequency × the mean fraction of the record's tokens
  found important.

Attention and important fractions come from ``ReportAttention``; frequency counts every Fetch of a
record, hit or miss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

Priority = tuple[float, int]


@dataclasses.dataclass(slots=True)
class RecordStats:
    """What the cache knows of one record, whether or not its bytes are cached."""

    frequency: int = 0
    attention: float = 0.0
    important_sum: float = 0.0
    reports: int = 0
    last_access: int = 0

    @property
    def important_fraction(self) -> float:
        """Mean reported fraction of important tokens (0 before any report)."""
        return self.important_sum / self.reports if self.reports else 0.0


def _attention(s: RecordStats) -> Priority:
    return (s.attention * s.frequency, s.last_access)


def _lru(s: RecordStats) -> Priority:
    return (0.0, s.last_access)


def _lfu(s: RecordStats) -> Priority:
    return (float(s.frequency), s.last_access)


def _impress(s: RecordStats) -> Priority:
    return (s.frequency * s.important_fraction, s.last_access)


POLICIES: dict[str, Callable[[RecordStats], Priority]] = {
    "attention": _attention,
    "lru": _lru,
    "lfu": _lfu,
    "impress": _impress,
}
DEFAULT_POLICY = "attention"


def policy(name: str) -> Callable[[RecordStats], Priority]:
    """The priority function called ``name``; ``ValueError`` listing the known names."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"cache policy {name!r} is not one of {', '.join(POLICIES)}") from None
