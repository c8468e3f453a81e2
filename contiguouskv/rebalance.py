"""``contiguouskv rebalance``: copy stored prefixes to the cache shards that own them now.

After shards are added (or the replication factor raised), the compute servers place each prefix on
its new replicas at once, but the objects are still where they were written. This command lists
what every shard holds (ListPrefixes), plans with :func:`~contiguouskv.common.placement.plan_rebalance`
and copies each missing replica from a shard that holds the object: every record of every region is
read with Fetch and written with PutPrefix (the target commits it durably, as any registration;
storing an object the target already has is a no-op). With ``--delete`` the copies on shards that
no longer own an object are removed, but only once all of that object's copies succeeded.

``--drain`` names shards that are leaving: they are read from, never written to (and emptied with
``--delete``). Every shard listed must answer ListPrefixes, or nothing is done. Torch-free: it runs
from the storage image too (``python -m contiguouskv.rebalance``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field

import grpc

from contiguouskv.common.fetch_wire import decode_fetch_response
from contiguouskv.common.security import ClientTls, open_aio_channel
from contiguouskv.common import discovery
from contiguouskv.common.placement import Copy, PlacedObject, RebalancePlan, effective_replication, plan_rebalance
from contiguouskv.connection import add_connection_arguments, token_from_args, tls_from_args
from contiguouskv.v1 import cache_pb2 as pb, cache_pb2_grpc

FETCH_METHOD = "/contiguouskv.v1.CacheService/Fetch"
MAX_MESSAGE_BYTES = 64 << 20
BATCH_BYTES = 1 << 20
INDICES_PER_READ = 1 << 16


class RebalanceError(Exception):
    """A shard could not be listed, or a copy failed; the message names the shard."""


@dataclass
class RebalanceReport:
    shards: list[str]
    drained: list[str]
    replication: int
    dry_run: bool
    objects: int = 0
    in_place: int = 0
    planned_copies: list[dict[str, str]] = field(default_factory=list)
    planned_deletes: list[dict[str, str]] = field(default_factory=list)
    copied: int = 0
    bytes_copied: int = 0
    deleted: int = 0
    failed: list[str] = field(default_factory=list)


class _Shards:
    """One channel per shard, opened lazily, closed together."""

    def __init__(self, timeout: float, tls: ClientTls | None = None, token: str | None = None) -> None:
        self.timeout = timeout
        self._tls, self._token = tls, token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = open_aio_channel(address, self._tls, self._token, [
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        return self._channels[address]

    def stub(self, address: str) -> cache_pb2_grpc.CacheServiceStub:
        return cache_pb2_grpc.CacheServiceStub(self.channel(address))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _err(address: str, what: str, err: grpc.aio.AioRpcError) -> RebalanceError:
    code = err.code().name if err.code() is not None else "UNKNOWN"
    return RebalanceError(f"{what} on {address}: {code}: {err.details()}")


async def list_holdings(shards: _Shards, addresses: Sequence[str]) -> dict[str, list[PlacedObject]]:
    """What every shard holds; RebalanceError naming the shards that did not answer."""
    async def one(address: str) -> list[PlacedObject]:
        try:
            reply = await shards.stub(address).ListPrefixes(pb.ListPrefixesRequest(), timeout=shards.timeout)
        except grpc.aio.AioRpcError as err:
            raise _err(address, "ListPrefixes", err) from err
        return [(m.prefix_id, m.layout) for m in reply.manifests]

    results = await asyncio.gather(*(one(a) for a in addresses), return_exceptions=True)
    failed = [str(r) for r in results if isinstance(r, BaseException)]
    if failed:
        raise RebalanceError("cannot list every shard, nothing done: " + "; ".join(failed))
    return {a: r for a, r in zip(addresses, results)}  # type: ignore[misc]


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """(position, length) of each run of consecutive indices."""
    runs, start = [], 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1:
            runs.append((start, i - start))
            start = i
    return runs


async def copy_object(shards: _Shards, copy: Copy) -> int:
    """Copy one object (every record of every region) from ``copy.source`` to ``copy.target``.

    Returns the bytes the target wrote (0 when it already had the object).
    """
    (prefix_id, layout), source, target = copy.key, copy.source, copy.target
    try:
        manifest = (await shards.stub(source).GetManifest(
            pb.GetManifestRequest(prefix_id=prefix_id, layout=layout), timeout=shards.timeout)).manifest
    except grpc.aio.AioRpcError as err:
        raise _err(source, f"GetManifest {prefix_id}/{layout}", err) from err
    fetch = shards.channel(source).stream_stream(
        FETCH_METHOD, request_serializer=pb.FetchRequest.SerializeToString,
        response_deserializer=decode_fetch_response)(timeout=shards.timeout)
    sizes = {r.name: r.record_size for r in manifest.regions}
    expected = sum(r.num_records for r in manifest.regions)
    problem: list[str] = []

    async def requests() -> AsyncIterator[pb.PutPrefixRequest]:
        yield pb.PutPrefixRequest(header=pb.PutPrefixHeader(
            prefix_id=prefix_id, layout=layout, regions=manifest.regions, metadata=manifest.metadata))
        received = 0
        try:
            await fetch.write(pb.FetchRequest(open=pb.FetchOpen(prefix_id=prefix_id, layout=layout,
                                                                 max_batch_bytes=BATCH_BYTES)))
            tag = 0
            for region in manifest.regions:
                for first in range(0, region.num_records, INDICES_PER_READ):
                    tag += 1
                    indices = range(first, min(first + INDICES_PER_READ, region.num_records))
                    await fetch.write(pb.FetchRequest(read=pb.FetchRead(tag=tag, region=region.name, indices=indices)))
            await fetch.done_writing()
            while (m := await fetch.read()) is not grpc.aio.EOF:
                if m.error_code:
                    problem.append(f"Fetch {prefix_id}/{layout} on {source}: code {m.error_code}: {m.error_message}")
                    return  # no commit: the target drops what it received
                size = sizes[m.region]
                for pos, count in _runs(m.indices):
                    yield pb.PutPrefixRequest(data=pb.PutPrefixData(
                        region=m.region, first_record=m.indices[pos],
                        data=bytes(m.data[pos * size : (pos + count) * size])))
                received += len(m.indices)
        except grpc.aio.AioRpcError as err:
            problem.append(str(_err(source, f"Fetch {prefix_id}/{layout}", err)))
            return
        if received != expected:
            problem.append(f"Fetch {prefix_id}/{layout} on {source}: {received} of {expected} records")
            return
        yield pb.PutPrefixRequest(commit=pb.PutPrefixCommit())

    try:
        reply = await shards.stub(target).PutPrefix(requests(), timeout=shards.timeout)
    except grpc.aio.AioRpcError as err:
        if problem:
            raise RebalanceError(problem[0]) from err
        raise _err(target, f"PutPrefix {prefix_id}/{layout}", err) from err
    finally:
        fetch.cancel()
    if problem:
        raise RebalanceError(problem[0])
    if reply.manifest.total_bytes != manifest.total_bytes:
        raise RebalanceError(f"PutPrefix {prefix_id}/{layout} on {target}: {reply.manifest.total_bytes} bytes "
                             f"committed, the source has {manifest.total_bytes}")
    return int(reply.bytes_written)


async def rebalance(cache: Sequence[str], drain: Sequence[str] = (), replication: int = 0, dry_run: bool = False,
                    delete: bool = False, parallel: int = 4, timeout: float = 600.0, *,
                    tls: ClientTls | None = None, token: str | None = None) -> RebalanceReport:
    """List, plan, copy (and delete); see the module docstring. ``tls``/``token``: how shards are reached
    (the token needs the read and write scopes)."""
    addresses = discovery.expand(cache)
    leaving = [a for a in discovery.expand(drain) if a not in addresses]
    if not addresses:
        raise RebalanceError(f"--cache {','.join(cache)}: no shard")
    shards = _Shards(timeout, tls, token)
    try:
        holdings = await list_holdings(shards, addresses + leaving)
        plan: RebalancePlan = plan_rebalance(holdings, addresses, replication, delete)
        report = RebalanceReport(addresses, leaving, effective_replication(replication, len(addresses)), dry_run,
                                 objects=len({o for objs in holdings.values() for o in objs}), in_place=plan.in_place)
        report.planned_copies = [dict(prefix_id=c.key[0], layout=c.key[1], source=c.source, target=c.target)
                                 for c in plan.copies]
        report.planned_deletes = [dict(prefix_id=k[0], layout=k[1], shard=s) for k, s in plan.deletes]
        if dry_run:
            return report
        gate = asyncio.Semaphore(max(1, parallel))
        failed_keys: set[PlacedObject] = set()

        async def run_copy(copy: Copy) -> None:
            async with gate:
                try:
                    report.bytes_copied += await copy_object(shards, copy)
                    report.copied += 1
                except RebalanceError as err:
                    failed_keys.add(copy.key)
                    report.failed.append(str(err))

        await asyncio.gather(*(run_copy(c) for c in plan.copies))
        for (prefix_id, layout), shard in plan.deletes:
            if (prefix_id, layout) in failed_keys:
                continue
            try:
                await shards.stub(shard).DeletePrefix(pb.DeletePrefixRequest(prefix_id=prefix_id, layout=layout),
                                                      timeout=timeout)
                report.deleted += 1
            except grpc.aio.AioRpcError as err:
                report.failed.append(str(_err(shard, f"DeletePrefix {prefix_id}/{layout}", err)))
        return report
    finally:
        await shards.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True,
                        help="the cache shards now, HOST:PORT[,...] or dns:///NAME:PORT, as the compute servers list them")
    parser.add_argument("--drain", default="", help="shards leaving the list: copied from, never to (HOST:PORT[,...])")
    parser.add_argument("--replication", type=int, default=0,
                        help="shards per prefix, as the compute servers use (default 2 where >= 2 shards, else 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, copy nothing")
    parser.add_argument("--delete", action="store_true",
                        help="remove copies from shards that no longer own them, once every copy of that object succeeded")
    parser.add_argument("--parallel", type=int, default=4, help="objects copied at once (default 4)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per call (default 600)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_connection_arguments(parser, "the cache shards", "read,write")


def _split(raw: str) -> list[str]:
    return [a.strip() for a in raw.split(",") if a.strip()]


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when everything planned was done, 1 otherwise."""
    cache, drain = _split(args.cache), _split(args.drain)
    for entry in cache + drain:
        discovery.check_entry(entry)  # ValueError: the CLI prints it
    if args.replication < 0:
        raise ValueError("--replication: must be >= 0")
    try:
        report = asyncio.run(rebalance(cache, drain, args.replication, args.dry_run, args.delete, args.parallel,
                                       args.timeout, tls=tls_from_args(args), token=token_from_args(args)))
    except RebalanceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        verb = "would copy" if report.dry_run else "copy"
        for c in report.planned_copies:
            print(f"{verb} {c['prefix_id']} {c['layout']}: {c['source']} -> {c['target']}")
        for d in report.planned_deletes:
            print(f"{'would delete' if report.dry_run else 'delete'} {d['prefix_id']} {d['layout']} from {d['shard']}")
        for failure in report.failed:
            print(f"failed: {failure}", file=sys.stderr)
        copies, deletes = len(report.planned_copies), len(report.planned_deletes)
        if report.dry_run:
            done = f"would copy {copies} and delete {deletes} (dry run)"
        else:
            done = (f"copied {report.copied} of {copies} ({report.bytes_copied / 2**20:.1f} MiB written), "
                    f"deleted {report.deleted} of {deletes}, {len(report.failed)} failed")
        print(f"{report.objects} objects on {len(report.shards)} shards (replication {report.replication}), "
              f"{report.in_place} in place: {done}", file=sys.stderr)
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contiguouskv.rebalance", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
