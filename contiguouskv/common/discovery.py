"""Cache shard addresses from the configured list, expanding ``dns:///NAME:PORT`` entries.

A plain ``HOST:PORT`` entry is one shard, whatever its name resolves to (gRPC resolves it).
An entry ``dns:///NAME:PORT`` stands for every address NAME resolves to (A and AAAA records), as
a Kubernetes headless Service does for the pods of a StatefulSet. Each address becomes one shard.

Placement hashes address *strings*, and pod IPs change when a pod is rescheduled, so each IP is
turned back into a stable name by a reverse (PTR) lookup: Kubernetes DNS answers
``cache-0.cache-headless.NS.svc.cluster.local`` for a StatefulSet pod behind a headless Service.
When that name is ``<label>.NAME[.anything]`` the shard is written ``<label>.NAME:PORT``, which is
the same string as listing the pod by hand (``cache-0.cache-headless:50051``), so switching
between the two forms moves no prefix. Other PTR names are used as they are; an IP without one
stays an IP (and its prefixes move if it changes: run ``contiguouskv rebalance`` then).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

DNS_PREFIX = "dns:///"

Resolve = Callable[[str, int], list[str]]
Reverse = Callable[[str], str | None]


def is_dns(entry: str) -> bool:
    return entry.startswith(DNS_PREFIX)


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_entry(entry: str) -> None:
    """ValueError naming what is wrong with one configured cache entry."""
    split_host_port(entry[len(DNS_PREFIX):] if is_dns(entry) else entry)


def resolve_addresses(name: str, port: int) -> list[str]:
    """Every IP ``name`` resolves to (system resolver, TCP), sorted."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def reverse_name(ip: str) -> str | None:
    """The PTR name of ``ip``, or None."""
    try:
        return socket.gethostbyaddr(ip)[0]
    except OSError:
        return None


def _join(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def stable_name(ip: str, queried: str, ptr: str | None) -> str:
    """The shard's host for ``ip`` found under ``queried``: ``<label>.<queried>`` when the PTR name
    is of that form, else the PTR name, else the IP."""
    if not ptr:
        return ip
    ptr = ptr.rstrip(".")
    label, _, rest = ptr.partition(".")
    queried = queried.rstrip(".")
    if label and (rest == queried or rest.startswith(queried + ".")):
        return f"{label}.{queried}"
    return ptr


def expand(entries: Iterable[str], resolve: Resolve = resolve_addresses,
           reverse: Reverse = reverse_name) -> list[str]:
    """The shard addresses for ``entries``: plain ones as given, DNS ones resolved (blocking).

    A DNS name that does not resolve contributes nothing (an ``OSError`` from ``resolve`` is
    swallowed); the caller decides what an empty or shrunken list means.
    """
    out: list[str] = []
    for entry in entries:
        if not is_dns(entry):
            out.append(entry)
            continue
        name, port = split_host_port(entry[len(DNS_PREFIX):])
        try:
            ips = resolve(name, port)
        except OSError:
            continue
        out += [_join(stable_name(ip, name, reverse(ip)), port) for ip in ips]
    return sorted(set(out), key=out.index)
