"""PNG plots of a bench run: per-layer I/O wait vs compute per policy, and TTFT against budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_reprefill(rows: list[Any], results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``timeline.png`` and ``ttft_vs_budget.png`` into ``out``; returns the paths."""
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: the bench extra

    out.mkdir(parents=True, exist_ok=True)
    cold = [r for r in rows if r.cache == "cold" and r.layers]
    fig, axes = plt.subplots(len(cold), 1, figsize=(10, 1.6 * len(cold) + 1), sharex=True, squeeze=False)
    for ax, row in zip(axes[:, 0], cold):
        waits = [w for w, _ in row.layers]
        comps = [c for _, c in row.layers]
        layers = range(len(row.layers))
        ax.bar(layers, waits, color="tab:red", label="I/O wait")
        ax.bar(layers, comps, bottom=waits, color="tab:blue", label="compute")
        ax.set_ylabel("ms")
        ax.set_title(f"{row.policy} budget {row.budget:g}", fontsize=9, loc="left")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    timeline = out / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, policy in enumerate(dict.fromkeys(r["policy"] for r in results)):
        points = sorted((r["budget"], r["ttft_ms_p50"]) for r in results if r["policy"] == policy and r["cache"] == "cold")
        if len(points) == 1:
            ax.axhline(points[0][1], linestyle="--", label=policy, color=f"C{i}")
        else:
            ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=policy, color=f"C{i}")
    ax.set_xlabel("budget (fraction of chunks)")
    ax.set_ylabel("TTFT p50 (ms), cold")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ttft = out / "ttft_vs_budget.png"
    fig.savefig(ttft, dpi=110)
    plt.close(fig)
    return [timeline, ttft]
