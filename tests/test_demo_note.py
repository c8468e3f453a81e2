"""The demo's closing note is computed from the run's own `full` rows."""

from __future__ import annotations

from contiguouskv.demo import _regime_note


def test_the_note_reports_full_s_mean_wait_compute_and_bytes() -> None:
    rows = [("q1", "full", 220.0, 30.0, 170.0, 24 << 20), ("q2", "full", 240.0, 50.0, 190.0, 24 << 20),
            ("q1", "contiguous 25%", 300.0, 5.0, 295.0, 6 << 20)]
    note = _regime_note(rows, 1423, "cpu")
    assert "24.0 MiB of this 1,423-token prefix" in note
    assert "waiting 40 ms on average, against 180 ms of compute on the cpu (18% waiting)" in note
