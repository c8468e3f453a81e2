"""Which reads of a Fetch stream are unfinished, and what of them is still missing (no I/O).

A read's records arrive in the order asked, so ``received`` counts how many of its indices are in.
After a fail-over the loader sends again, under the same tags, only the indices still missing.
Used on the event loop only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PendingRead:
    """A read sent on the stream and not finished: ``indices[:received]`` have arrived."""

    region: str
    indices: list[int]
    priority: int
    received: int = 0

    @property
    def missing(self) -> int:
        return len(self.indices) - self.received


class ReadLedger:
    """Unfinished reads by tag."""

    def __init__(self) -> None:
        self._reads: dict[int, PendingRead] = {}

    def __len__(self) -> int:
        return len(self._reads)

    def sent(self, tag: int, region: str, indices: list[int], priority: int) -> None:
        """A read went out (an empty one has nothing to wait for)."""
        if indices:
            self._reads[tag] = PendingRead(region, list(indices), priority)

    def cancelled(self, tags: list[int]) -> None:
        for tag in tags:
            self._reads.pop(tag, None)

    def arrived(self, tag: int, count: int, done: bool) -> None:
        """``count`` more records of ``tag`` arrived; ``done``: the server finished the read."""
        read = self._reads.get(tag)
        if read is None:
            return
        read.received += count
        if done or read.received >= len(read.indices):
            del self._reads[tag]

    def replay(self) -> list[tuple[int, PendingRead]]:
        """The unfinished reads, tag order, each cut to the indices still missing (and kept so)."""
        out = []
        for tag, read in sorted(self._reads.items()):
            rest = PendingRead(read.region, read.indices[read.received :], read.priority)
            self._reads[tag] = rest
            out.append((tag, rest))
        return out
