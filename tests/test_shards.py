"""Placement (rendezvous hashing with replicas), the rebalance plan, shard discovery and the config.

Pure functions only: no server, no torch.
"""

from __future__ import annotations

import asyncio
import collections

import pytest
from hypothesis import given, settings, strategies as st

from contiguouskv.common import discovery
from contiguouskv.compute_server.config import ComputeServerConfig
from contiguouskv.common.placement import (
    default_write_quorum, effective_replication, effective_write_quorum, placement_changes, plan_rebalance,
    rendezvous_order, replica_set,
)

shard_lists = st.lists(st.from_regex(r"[a-z]{1,8}-[0-9]{1,3}:[0-9]{2,5}", fullmatch=True), min_size=1, max_size=9,
                       unique=True)
keys = st.lists(st.from_regex(r"[0-9a-f]{32}", fullmatch=True), min_size=1, max_size=40, unique=True)


def test_defaults() -> None:
    assert [effective_replication(0, n) for n in range(5)] == [0, 1, 2, 2, 2]
    assert effective_replication(3, 2) == 2 and effective_replication(1, 5) == 1
    assert [default_write_quorum(r) for r in range(1, 6)] == [1, 2, 2, 3, 3]
    assert effective_write_quorum(0, 3) == 2 and effective_write_quorum(1, 2) == 1 and effective_write_quorum(3, 2) == 2


def test_order_is_a_permutation_independent_of_list_order() -> None:
    shards = [f"cache-{i}.cache-headless:50051" for i in range(6)]
    for i in range(50):
        key = f"{i:032x}"
        order = rendezvous_order(key, shards)
        assert sorted(order) == sorted(shards)
        assert rendezvous_order(key, list(reversed(shards))) == order
        assert replica_set(key, shards, 2) == order[:2]


def test_spread_is_even() -> None:
    shards = [f"10.0.0.{i}:50051" for i in range(4)]
    owners = collections.Counter(rendezvous_order(f"{i:032x}", shards)[0] for i in range(4000))
    assert all(800 < n < 1200 for n in owners.values()), owners


@settings(max_examples=200, deadline=None)
@given(shards=shard_lists, keys=keys, new=st.from_regex(r"new-[0-9]{1,3}:[0-9]{2,5}", fullmatch=True),
       replication=st.integers(1, 4))
def test_adding_a_shard_moves_only_what_it_now_owns(shards: list[str], keys: list[str], new: str,
                                                    replication: int) -> None:
    grown = shards + [new]
    r_old, r_new = effective_replication(replication, len(shards)), effective_replication(replication, len(grown))
    for key in keys:
        before, after = replica_set(key, shards, r_old), replica_set(key, grown, r_new)
        if new not in after:
            assert after == before  # untouched, same read order
        else:
            # the new shard took one place; the old shards kept their relative order
            assert [a for a in after if a != new] == before[: r_new - 1]
    for change in placement_changes(keys, shards, grown, replication):
        assert change.gained == [new]
        assert len(change.lost) <= 1 and (r_new > r_old or change.lost)
    moved = {c.key for c in placement_changes(keys, shards, grown, replication)}
    assert moved == {k for k in keys if new in replica_set(k, grown, r_new)}


@settings(max_examples=100, deadline=None)
@given(shards=shard_lists.filter(lambda s: len(s) >= 2), keys=keys, replication=st.integers(1, 3))
def test_removing_a_shard_moves_only_what_it_held(shards: list[str], keys: list[str], replication: int) -> None:
    gone, rest = shards[-1], shards[:-1]
    for change in placement_changes(keys, shards, rest, replication):
        assert gone in change.before
        assert gone not in change.after


@settings(max_examples=100, deadline=None)
@given(shards=shard_lists, keys=keys, replication=st.integers(1, 3), data=st.data())
def test_plan_restores_every_replica(shards: list[str], keys: list[str], replication: int,
                                     data: st.DataObject) -> None:
    # each object on some random non-empty subset of shards (plus possibly a draining shard)
    everywhere = shards + ["old-0:1"]
    holdings: dict[str, list[tuple[str, str]]] = {s: [] for s in everywhere}
    for key in keys:
        for shard in data.draw(st.sets(st.sampled_from(everywhere), min_size=1)):
            holdings[shard].append((key, "contiguous-c16-g8"))
    plan = plan_rebalance(holdings, shards, replication, delete=True)
    after = {s: set(objs) for s, objs in holdings.items()}
    for copy in plan.copies:
        assert copy.key in after[copy.source] and copy.target in shards
        after[copy.target].add(copy.key)
    for key, shard in plan.deletes:
        after[shard].discard(key)
    r = effective_replication(replication, len(shards))
    for key in keys:
        obj = (key, "contiguous-c16-g8")
        assert {s for s, objs in after.items() if obj in objs} == set(replica_set(key, shards, r))
    assert plan_rebalance({s: list(o) for s, o in after.items()}, shards, replication, delete=True).copies == []


def test_plan_prefers_a_replica_as_source_and_keeps_extra_copies_without_delete() -> None:
    shards = ["a:1", "b:1", "c:1"]
    key = "0" * 32
    first, second, third = rendezvous_order(key, shards)
    obj = (key, "l")
    plan = plan_rebalance({first: [], second: [obj], third: [obj]}, shards, 2)
    assert [(c.source, c.target) for c in plan.copies] == [(second, first)]
    assert plan.deletes == []
    plan = plan_rebalance({first: [], second: [obj], third: [obj]}, shards, 2, delete=True)
    assert plan.deletes == [(obj, third)]
    assert plan_rebalance({first: [obj], second: [obj], third: []}, shards, 2).in_place == 1


# --- discovery -----------------------------------------------------------------------------------
def test_plain_entries_pass_through_and_dns_entries_expand_to_stable_names() -> None:
    ips = {"cache-headless": ["10.1.0.7", "10.1.0.9", "10.1.0.8"]}
    ptr = {"10.1.0.7": "cache-0.cache-headless.ckv.svc.cluster.local.",
           "10.1.0.8": "cache-1.cache-headless.ckv.svc.cluster.local",
           "10.1.0.9": "node9.example.org"}
    got = discovery.expand(["a:1", "dns:///cache-headless:50051"], lambda name, port: ips[name], ptr.get)
    assert got == ["a:1", "cache-0.cache-headless:50051", "node9.example.org:50051", "cache-1.cache-headless:50051"]
    # no PTR record: the IP itself (v6 bracketed)
    got = discovery.expand(["dns:///svc:7"], lambda name, port: ["fd00::1", "10.0.0.1"], lambda ip: None)
    assert got == ["[fd00::1]:7", "10.0.0.1:7"]


def test_a_name_that_does_not_resolve_gives_nothing() -> None:
    def fail(name: str, port: int) -> list[str]:
        raise OSError("no such host")

    assert discovery.expand(["dns:///gone:1", "b:2"], fail, lambda ip: None) == ["b:2"]


def test_dns_expansion_on_this_machine() -> None:
    got = discovery.expand(["dns:///localhost:50051"])
    assert got and all(a.endswith(":50051") for a in got)


@pytest.mark.parametrize("entry", ["dns:///:1", "dns:///x", "x:y", "x:70000", ":5"])
def test_bad_entries(entry: str) -> None:
    with pytest.raises(ValueError):
        discovery.check_entry(entry)


# --- config --------------------------------------------------------------------------------------
def test_config_replication_and_quorum() -> None:
    base = dict(model="random:tiny", cache=("a:1", "b:1", "c:1"))
    assert ComputeServerConfig(**base).replication == 0  # type: ignore[arg-type]
    ComputeServerConfig(**base, replication=3, write_quorum=3)  # type: ignore[arg-type]
    for bad, field in ((dict(replication=4), "replication"), (dict(replication=2, write_quorum=3), "write_quorum"),
                       (dict(replication=-1), "replication"), (dict(cache_refresh_s=0), "cache_refresh_s")):
        with pytest.raises(ValueError, match=field):
            ComputeServerConfig(**base, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        ComputeServerConfig(model="random:tiny", cache=("dns:///headless",))
    # the shard count behind a DNS name is not known before it resolves
    ComputeServerConfig(model="random:tiny", cache=("dns:///cache-headless:50051",), replication=3)


async def test_the_client_follows_dns_and_keeps_its_shards_on_an_empty_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from contiguouskv.compute_server.cachenet.cache_client import CacheClient

    answers = [["cache-0.h:1", "cache-1.h:1"], [], ["cache-0.h:1", "cache-1.h:1", "cache-2.h:1"]]
    calls = []

    def fake_expand(entries: list[str]) -> list[str]:
        assert entries == ["dns:///h:1"]  # static entries are not resolved
        calls.append(entries)
        return answers[min(len(calls), len(answers)) - 1]

    monkeypatch.setattr(discovery, "expand", fake_expand)
    client = CacheClient(["dns:///h:1", "static:2"], 1 << 20, 5.0, refresh_s=3600)
    assert client.addresses == ["static:2"] and client.replication == 1
    await client.start()
    try:
        assert client.addresses == ["cache-0.h:1", "cache-1.h:1", "static:2"]
        assert client.replication == 2 and client.write_quorum == 2
        await client.refresh()
        assert client.addresses == ["cache-0.h:1", "cache-1.h:1", "static:2"]  # the empty answer kept them
        await client.refresh()
        assert client.addresses == ["cache-0.h:1", "cache-1.h:1", "cache-2.h:1", "static:2"]
        assert client.replicas("0" * 32) == replica_set("0" * 32, client.addresses, 2)
    finally:
        await client.close()
    client = CacheClient(["dns:///h:1"], 1 << 20, 5.0, refresh_s=0.01)  # and it does so periodically
    await client.start()
    try:
        for _ in range(500):
            if len(calls) >= 5:
                break
            await asyncio.sleep(0.01)
        assert len(calls) >= 5
    finally:
        await client.close()


def test_no_shard_known_is_unavailable() -> None:
    from contiguouskv.compute_server.cachenet.cache_client import CacheClient
    from contiguouskv.compute_server.errors import ComputeError

    client = CacheClient(["dns:///nothing-here:1"], 1 << 20, 5.0)
    with pytest.raises(ComputeError, match="no cache shard known") as info:
        client.replicas("0" * 32)
    assert info.value.code == "UNAVAILABLE"
