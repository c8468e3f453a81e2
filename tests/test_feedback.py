"""Attention feedback: every used record gets its chunk's share of the period's attention."""

from __future__ import annotations


import pytest
import torch

from contiguouskv.compute_server.policies.feedback import attention_report
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.policies.base import PeriodChoice


def test_report_maps_chunks_to_their_records_with_normalised_scores() -> None:
    layout = ContiguousLayout(num_tokens=50, num_layers=6, num_kv_heads=1, head_dim=4, dtype="float32", group_size=4)
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])  # m = 4 chunks
    periods = [PeriodChoice(0, 0, 3, [0, 2, 3], scores=scores),
               PeriodChoice(1, 3, 3, [0, 3], scores=torch.tensor([1.0, 0.0, 0.0, 1.0]))]
    report = {r.region: r for r in attention_report(layout, periods)}
    assert set(report) == {"kv/G0", "kv/G1"}
    got = {}
    for r in report.values():
        group = int(r.region[4:])
        for index, attention, fraction in zip(r.indices, r.attention, r.important_fraction):
            got[layout.kv_record_owner(group, index)] = attention
            assert fraction == 1.0
    expected = {(c, l): float(scores[c] / scores.sum()) for c in (0, 2, 3) for l in range(3)}
    expected.update({(c, l): 0.5 for c in (0, 3) for l in range(3, 6)})
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
