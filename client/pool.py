"""The compute servers one client talks to, taken in turn (round robin)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from contiguouskv.client.errors import InvalidArgumentError

C = TypeVar("C")
S = TypeVar("S")


def parse_addresses(address: str | Sequence[str]) -> tuple[str, ...]:
    """``"h:p"``, ``"h1:p1,h2:p2"`` or a list of ``"h:p"`` as a tuple of addresses, checked."""
    if not isinstance(address, (str, Sequence)) or any(not isinstance(a, str) for a in (
            [address] if isinstance(address, str) else address)):
        raise InvalidArgumentError(f"address: give \"HOST:PORT\", \"H1:P1,H2:P2\" or a list of them, got {address!r}")
    items = address.split(",") if isinstance(address, str) else list(address)
    addresses = tuple(a.strip() for a in items if a.strip())
    if not addresses:
        raise InvalidArgumentError("address: give at least one compute server HOST:PORT")
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgumentError(f"address: {a!r} is not HOST:PORT")
    return addresses


@dataclass(frozen=True)
class Endpoint(Generic[C, S]):
    """One server: its address, the channel the SDK owns and the stub over it."""

    address: str
    channel: C
    stub: S
    secure: bool = False  # the channel speaks TLS


class RoundRobin(Generic[C, S]):
    """Endpoints handed out in turn; safe to share between threads."""

    def __init__(self, addresses: Sequence[str], connect: Callable[[str], Endpoint[C, S]]) -> None:
        self.endpoints = tuple(connect(a) for a in addresses)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> Endpoint[C, S]:
        with self._lock:
            turn = next(self._turn)
        return self.endpoints[turn % len(self.endpoints)]
