"""Eviction rules of the DRAM cache: what a record is worth keeping, as a sortable priority.

An eviction rule (:data:`EvictionRule`) maps a record's :class:`RecordStats` to a priority tuple;
the cache evicts the record of lowest priority first (a min-heap) and admits a new record only if it
outranks the record it would evict. Every priority ends with the record's last access (a sequence
number), so ties go to the most recently used record, and a record nobody reported on is still
cached while there is room.

- ``attention`` (default, ContiguousKV): accumulated attention × access frequency.
- ``lru``: last access.
- ``lfu``: access frequency.
- ``impress`` (the IMPRESS baseline): access frequency × the mean fraction of the record's tokens
  found important.

Attention and important fractions come from ``ReportAttention``; frequency counts every Fetch of a
record, hit or miss. The cache server picks one with ``--eviction-rule`` (config ``eviction_rule``).
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


EvictionRule = Callable[[RecordStats], Priority]
"""A record's priority from its stats; the lowest priority is evicted first."""

EVICTION_RULES: dict[str, EvictionRule] = {
    "attention": _attention,
    "lru": _lru,
    "lfu": _lfu,
    "impress": _impress,
}
DEFAULT_EVICTION_RULE = "attention"


def eviction_rule(name: str) -> EvictionRule:
    """The eviction rule called ``name``; ``ValueError`` listing the known names."""
    try:
        return EVICTION_RULES[name]
    except KeyError:
        raise ValueError(f"eviction rule {name!r} is not one of {', '.join(EVICTION_RULES)}") from None
