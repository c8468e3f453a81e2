"""Attention feedback of the chunk policies for the cache server's DRAM cache.

For every period, every selected chunk's score (its attention mass at the period's scoring layer,
normalised to sum to 1 over the period) is attached to that chunk's kv records at each layer of the
period. The cache server only sees (region, record, attention, important fraction).
"""

from __future__ import annotations

from collections.abc import Sequence

from contiguouskv.compute_server.cachenet.attention import RegionScores
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.policies.base import PeriodChoice


def attention_report(layout: ContiguousLayout, periods: Sequence[PeriodChoice]) -> list[RegionScores]:
    """Per kv region: the records the request used, with their chunk's attention share."""
    out: dict[str, RegionScores] = {}
    for period in periods:
        scores = period.scores
        total = float(scores.sum()) if scores is not None else 0.0
        for chunk in period.chunks:
            share = float(scores[chunk]) / total if scores is not None and total > 0 else 0.0
            for layer in range(period.first_layer, period.first_layer + period.num_layers):
                region, index = layout.kv_record(chunk, layer)
                entry = out.setdefault(region, RegionScores(region, [], [], []))
                entry.indices.append(index)
                entry.attention.append(share)
                entry.important_fraction.append(1.0)  # a selected chunk is loaded whole
    return list(out.values())
