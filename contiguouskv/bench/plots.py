"""PNG plots of a bench run: per-layer I/O wait vs compute per policy, and TTFT against budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_reprefill(rows: list[Any], results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``timeline.png`` and ``ttft_vs_budget.png`` into ``out``, and ``scaling.png`` (TTFT and
    bytes read against prefix length) when the run covered several lengths; returns the paths."""
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
        ax.set_title(f"{row.policy} budget {row.budget:g}, {row.prefix_tokens} tokens", fontsize=9, loc="left")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    timeline = out / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)

    longest = max(r["prefix_tokens"] for r in results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, policy in enumerate(dict.fromkeys(r["policy"] for r in results)):
        points = sorted((r["budget"], r["ttft_ms_p50"]) for r in results if r["policy"] == policy
                        and r["cache"] == "cold" and r["prefix_tokens"] == longest and r.get("path", "grpc") == "grpc")
        if len(points) == 1:
            ax.axhline(points[0][1], linestyle="--", label=policy, color=f"C{i}")
        else:
            ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=policy, color=f"C{i}")
    ax.set_xlabel("budget (fraction of chunks)")
    ax.set_ylabel(f"TTFT p50 (ms), cold, {longest}-token prefix")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ttft = out / "ttft_vs_budget.png"
    fig.savefig(ttft, dpi=110)
    plt.close(fig)
    if len({r["prefix_tokens"] for r in results}) < 2:
        return [timeline, ttft]
    return [timeline, ttft, _scaling(plt, results, out / "scaling.png")]


def _scaling(plt: Any, results: list[dict[str, Any]], path: Path) -> Path:
    """TTFT p50 and bytes read from disk against prefix length, one line per (policy, budget), cold."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cold = [r for r in results if r["cache"] == "cold" and r.get("path", "grpc") == "grpc"]
    for i, key in enumerate(dict.fromkeys((r["policy"], r["budget"]) for r in cold)):
        points = sorted((r["prefix_tokens"], r["ttft_ms_p50"], r["bytes_from_disk"]) for r in cold
                        if (r["policy"], r["budget"]) == key)
        label = key[0] if key[1] >= 1.0 else f"{key[0]} {key[1]:g}"
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], marker="o", label=label, color=f"C{i % 10}")
        right.plot(xs, [p[2] / 2**20 for p in points], marker="o", label=label, color=f"C{i % 10}")
    for ax, what in ((left, "TTFT p50 (ms), cold"), (right, "MiB read from disk per request")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prefix tokens")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
