"""What a request reports back to the cache server about the records it used (``ReportAttention``).

The cache server's DRAM cache keeps records by these observations; it only sees (region, record,
attention share, important fraction). Loading policies produce them
(``LoadingPolicy.attention_report``); :meth:`~.cache_client.CacheClient.report_attention` sends them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegionScores:
    """Per record of one region: its attention share and the fraction of it that was important."""

    region: str
    indices: list[int]
    attention: list[float]
    important_fraction: list[float]
