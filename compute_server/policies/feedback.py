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
    """Per kv region: the records the request used, with their chunk's attention share.

    Built a layer at a time (:meth:`ContiguousLayout.kv_records_at`), not with a Python step per
    (chunk, layer): `full` over a 64K-token prefix uses 115K records."""
    out: dict[str, RegionScores] = {}
    for period in periods:
        chunks = list(period.chunks)
        scores = period.scores
        total = float(scores.sum()) if scores is not None else 0.0
        shares = ((scores[chunks] / total).tolist() if scores is not None and total > 0 and chunks
                  else [0.0] * len(chunks))
        for layer in range(period.first_layer, period.first_layer + period.num_layers):
            region, indices = layout.kv_records_at(chunks, layer)
            entry = out.setdefault(region, RegionScores(region, [], [], []))
            entry.indices.extend(indices)
            entry.attention.extend(shares)
            entry.important_fraction.extend([1.0] * len(chunks))  # a selected chunk is loaded whole
    return list(out.values())
