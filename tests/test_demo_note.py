"""The demo's closing note is computed from the run's own `full` rows."""

from __future__ import annotations

from contiguouskv.demo import _regime_note, _regime_table


def test_the_note_reports_full_s_mean_wait_compute_and_bytes() -> None:
    rows = [("q1", "full", 220.0, 30.0, 170.0, 24 << 20), ("q2", "full", 240.0, 50.0, 190.0, 24 << 20),
            ("q1", "contiguous 25%", 300.0, 5.0, 295.0, 6 << 20)]
    note = _regime_note(rows, 1423, "cpu")
    assert "24.0 MiB of this 1,423-token prefix" in note
    assert "waiting 40 ms on average, against 180 ms of compute on the cpu (18% waiting)" in note


def test_the_regime_table_gives_each_policy_s_speedup_over_full_from_the_run() -> None:
    rows = [("full", 2000.0, 300.0, 1700.0, 448 << 20), ("contiguous 5%", 500.0, 60.0, 440.0, 74 << 20),
            ("contiguous+ 5%", 1000.0, 50.0, 950.0, 70 << 20)]
    table = _regime_table(rows).splitlines()
    assert table[1].split()[-1] == "1.00x" and table[2].split()[-1] == "4.00x" and table[3].split()[-1] == "2.00x"
    assert "Reading 448 MiB made `full` wait 300 ms" in table[-1]
    assert "contiguous 5% read 74 MiB and answered 4.0x sooner" in table[-1]
