"""Which loading policies a benchmark runs: asked of the compute server, never listed here."""

from __future__ import annotations

from collections.abc import Sequence

from contiguouskv.client import ModelInfo, PolicyInfo

PRIMARY_LAYOUT = "contiguous"


def resolve(requested: str, info: ModelInfo, skip: Sequence[str] = ()) -> list[PolicyInfo]:
    """``requested``: ``all`` (every policy the server serves, except ``skip``) or comma-separated
    names; ValueError naming what the server serves when a name is unknown."""
    if requested.strip() in ("", "all"):
        return [p for p in info.policy_info if p.name not in skip]
    out = []
    for name in (n.strip() for n in requested.split(",") if n.strip()):
        try:
            out.append(info.policy(name))
        except KeyError:
            raise ValueError(f"policy {name!r} is not served by {info.name}'s server; "
                             f"it serves {', '.join(info.policies)}") from None
    return out


def extra_layouts(policies: Sequence[PolicyInfo]) -> list[str]:
    """Layouts a prefix must be registered with, besides the primary one, for these policies."""
    return sorted({p.layout for p in policies} - {PRIMARY_LAYOUT})


def cells(policies: Sequence[PolicyInfo], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """(policy, budget) pairs: every budget for a selective policy, 1.0 alone for the others."""
    return [(p.name, b) for p in policies for b in (budgets if p.selective else [1.0])]
