"""Placement of prefixes on cache shards: rendezvous hashing with replicas (pure, no I/O).

Every compute server ranks the shard *addresses* for a prefix id by ``blake2b(address|prefix_id)``
(highest random weight first). The first ``R`` of that order are the prefix's replicas; reads try
them in that order, writes go to all of them. Nothing is coordinated between compute servers: the
same address strings give the same placement everywhere.

Adding a shard ``s`` changes a prefix's replica set only where ``s`` now ranks among its first
``R``; it then takes the place of the old ``R``-th replica and nothing moves between old shards.
:func:`placement_changes` computes exactly that; :func:`plan_rebalance` turns what the shards hold
into the copies (and optional deletes) that restore the placement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

PlacedObject = tuple[str, str]
"""(prefix_id, layout): one stored object, as placement sees it (a plain tuple, not the cache server's
validated ``ObjectKey``). Every layout of a prefix lives on the prefix's replicas."""


def _weight(address: str, key: str) -> bytes:
    return hashlib.blake2b(f"{address}|{key}".encode(), digest_size=8).digest()


def rendezvous_order(key: str, addresses: Iterable[str]) -> list[str]:
    """Distinct addresses ordered by highest random weight for ``key`` (first = owner)."""
    return sorted(set(addresses), key=lambda a: (_weight(a, key), a), reverse=True)


def default_replication(num_shards: int) -> int:
    """2 where there are at least two shards, else 1."""
    return 2 if num_shards >= 2 else 1


def effective_replication(configured: int, num_shards: int) -> int:
    """The replication factor in use: ``configured`` (0 = default), at most the number of shards."""
    r = configured or default_replication(num_shards)
    return max(0, min(r, num_shards))


def default_write_quorum(replication: int) -> int:
    """A majority of the replicas: 1 of 1, 2 of 2, 2 of 3, 3 of 4 or 5."""
    return replication // 2 + 1 if replication > 0 else 0


def effective_write_quorum(configured: int, replication: int) -> int:
    """The write quorum in use: ``configured`` (0 = majority), at most ``replication``."""
    return min(configured or default_write_quorum(replication), replication)


def replica_set(key: str, addresses: Iterable[str], replication: int) -> list[str]:
    """The ``replication`` shards that hold ``key``, in read order."""
    return rendezvous_order(key, addresses)[:replication]


@dataclass(frozen=True)
class Change:
    """How one prefix's replica set differs between two shard lists."""

    key: str
    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def gained(self) -> list[str]:
        """Shards that must receive a copy."""
        return [a for a in self.after if a not in self.before]

    @property
    def lost(self) -> list[str]:
        """Shards that no longer own the prefix."""
        return [a for a in self.before if a not in self.after]


def placement_changes(keys: Iterable[str], old: Sequence[str], new: Sequence[str],
                      replication: int) -> list[Change]:
    """The prefixes whose replica set (as a set) differs between ``old`` and ``new`` shard lists.

    ``replication`` is the configured factor (0 = default), applied to each list's own size.
    """
    r_old = effective_replication(replication, len(set(old)))
    r_new = effective_replication(replication, len(set(new)))
    changes = []
    for key in keys:
        before, after = replica_set(key, old, r_old), replica_set(key, new, r_new)
        if set(before) != set(after):
            changes.append(Change(key, tuple(before), tuple(after)))
    return changes


@dataclass(frozen=True)
class Copy:
    key: PlacedObject
    source: str
    target: str


@dataclass
class RebalancePlan:
    """Copies that give every object all its replicas; deletes of copies on shards that do not own it.

    A delete is planned only for objects whose every target holds it or is planned to receive it;
    the executor skips it when one of that object's copies failed.
    """

    copies: list[Copy] = field(default_factory=list)
    deletes: list[tuple[PlacedObject, str]] = field(default_factory=list)
    in_place: int = 0  # objects already on exactly their replicas

    def copies_of(self, key: PlacedObject) -> list[Copy]:
        return [c for c in self.copies if c.key == key]


def plan_rebalance(holdings: Mapping[str, Iterable[PlacedObject]], shards: Sequence[str], replication: int,
                   delete: bool = False) -> RebalancePlan:
    """What to copy (and with ``delete``, remove) so each object lives on its replicas among ``shards``.

    ``holdings`` maps every shard that was listed (including ones being drained, absent from
    ``shards``) to the objects it holds. A copy reads from a holder that is one of the object's
    replicas when there is one (in read order), else from the first holder in rendezvous order.
    """
    r = effective_replication(replication, len(set(shards)))
    holders: dict[PlacedObject, set[str]] = {}
    for shard, objects in holdings.items():
        for obj in objects:
            holders.setdefault(obj, set()).add(shard)
    plan = RebalancePlan()
    for obj in sorted(holders):
        have = holders[obj]
        targets = replica_set(obj[0], shards, r)
        missing = [t for t in targets if t not in have]
        sources = [t for t in targets if t in have] + [a for a in rendezvous_order(obj[0], have) if a not in targets]
        for target in missing:
            plan.copies.append(Copy(obj, sources[0], target))
        extra = sorted(have - set(targets))
        if not missing and not extra:
            plan.in_place += 1
        if delete:
            plan.deletes += [(obj, shard) for shard in extra]
    return plan
