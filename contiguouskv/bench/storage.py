"""``contiguouskv bench storage``: the storage node's read path, from disk, through gRPC, from DRAM.

One run writes a prefix-sized object of random records in the ``contiguous`` layout's shape
(default ``kvheavy``: 16K tokens, 16-token chunks, 28 layers in groups of 8, 4 KV heads of 128
dims, bf16, so one record = one chunk at one layer = 32 KiB and a sub-period of 4 layers = one
128 KiB coalesced read), drops it from the page cache and checks that none of it is resident, then
reads random selections of chunks (default 5, 10, 25 and 100 %) three ways:

(a) ``raw``: the server's own read path (fetch session, batch assembler, read pool) in this process;
(b) ``grpc``: a cache server process, read over a Fetch stream by a separate client process;
(c) ``dram``: a second cache server whose DRAM cache holds the selection (read once to warm it).

A selection asks, like the compute server, one Fetch read per (group, sub-period): the chunk-major
records of the chosen chunks at that sub-period's layers, all reads of one selection at once.

The machine is shared and noisy, so (a) and (b) are measured side by side in ``--rounds`` rounds
(default 5): each round reads fresh random selections both ways, one right after the other,
alternating which way goes first. A round's ratio grpc/raw compares two reads of the same bytes made
under the same conditions; the report gives each way's round of median GB/s and the median
of the rounds' ratios (``grpc_over_raw``), with every round's values in the JSON. It prints GB/s,
records/s, p50/p99 latency per read and grpc/raw; ``--json FILE`` writes the same.
No torch: records are random bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from contiguouskv.cache_server.assemble import BatchAssembler
from contiguouskv.cache_server.buffers import ReadBuffers
from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.fetch import DISK_BYTES_PER_PAYLOAD_BYTE, FetchSession
from contiguouskv.cache_server.keys import ObjectKey, object_paths
from contiguouskv.cache_server.read_process import ReadProcesses
from contiguouskv.cache_server.server import HELPER_SLOTS
from contiguouskv.cache_server.store import RecordStore
from contiguouskv.common.fetch_wire import BULK_RECEIVE_OPTIONS, decode_fetch_response
from contiguouskv.common.malloc import keep_freed_buffers
from contiguouskv.common.serving import run_async
from contiguouskv.v1 import cache_pb2 as pb
from contiguouskv.v1 import cache_pb2_grpc

PREFIX_ID, LAYOUT = "bench", "contiguous-c16-g8"
Request = tuple[str, list[int]]  # (region, record indices)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bench storage`` (every one has a default: the kvheavy shape)."""
    a = parser.add_argument
    a("--tokens", type=int, default=16384, help="prefix tokens (16384)")
    a("--chunk", type=int, default=16, help="tokens per chunk (16)")
    a("--layers", type=int, default=28, help="layers (28)")
    a("--group", type=int, default=8, help="layers per storage group (8)")
    a("--sub-period", type=int, default=4, help="layers per Fetch read (4)")
    a("--kv-heads", type=int, default=4, help="KV heads (4)")
    a("--head-dim", type=int, default=128, help="head dim (128)")
    a("--dtype-bytes", type=int, default=2, help="bytes per value (2: bf16)")
    a("--selections", default="0.05,0.1,0.25,1.0", help="fractions of chunks to read")
    a("--target-mb", type=float, default=600.0, help="read about this many MB per selection and way")
    a("--batch-bytes", type=int, default=1 << 20, help="payload per Fetch response (1 MiB)")
    a("--inflight-bytes", type=int, default=16 << 20, help="server in-flight bytes per stream")
    a("--read-threads", type=int, default=16, help="server read threads (16)")
    a("--read-processes", type=int, default=1,
      help="helper processes making the reads, sharing the read threads (1; 0 = in-process threads)")
    a("--streams", type=int, default=1, help="Fetch streams of the gRPC client, reads spread over them")
    a("--decoder", choices=("raw", "protobuf"), default="raw",
      help="client parsing of Fetch responses (raw: zero-copy payload view)")
    a("--workdir", type=Path, help="where to write the object (a temp dir on this disk by default)")
    a("--rounds", type=int, default=5,
      help="rounds of raw and gRPC reads side by side (5); medians are reported")
    a("--seed", type=int, default=0, help="random seed of the selections (default 0)")
    a("--json", type=Path, help="also write the results to this file")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints a table; returns 0 (1 if the page cache could not be bypassed)."""
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    keep_freed_buffers(os.environ)  # the raw way gets the servers' malloc settings too
    shape = _shape(args)
    fractions = [float(f) for f in args.selections.split(",")]
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="ckv-bench-", dir=os.getcwd())))
        root = Path(workdir) / "store"
        data_path = _write_object(root, shape, args.seed)
        resident = _drop_from_page_cache(data_path)
        print(f"object: {shape['records']} records of {shape['record_size']} B "
              f"({shape['records'] * shape['record_size'] / 1e9:.2f} GB) at {data_path}; "
              f"page-cache resident after drop: {resident:.1%}")
        rounds: dict[float, list[dict]] = {f: [] for f in fractions}
        with _server(root, args, dram_bytes=0) as address:
            for r in range(args.rounds):
                for f in fractions:
                    plans = _plans(shape, f, args, r)
                    order = ("raw", "grpc") if r % 2 == 0 else ("grpc", "raw")
                    rounds[f].append({way: asyncio.run(_read_raw(root, plans, args)) if way == "raw"
                                      else _read_grpc_process(address, plans, args, warm=False)
                                      for way in order})
        dram = {}
        with _server(root, args, dram_bytes=shape["records"] * shape["record_size"] * 2) as address:
            for f in fractions:
                dram[f] = _read_grpc_process(address, _plans(shape, f, args, 0), args, warm=True)
        # O_DIRECT reads leave no page of the file in the page cache: none after every way ran
        # proves that raw and grpc both read from the disk (the dram way's warm-up too).
        resident_after = _resident(data_path)
        report = _report(shape, resident, fractions, rounds, dram)
        report["page_cache_resident_after"] = resident_after
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["direct_io"] and resident == 0.0 and resident_after == 0.0 else 1


# -- the object ------------------------------------------------------------------------------

def _shape(args: argparse.Namespace) -> dict:
    chunks = -(-args.tokens // args.chunk)
    groups = [min(args.group, args.layers - g) for g in range(0, args.layers, args.group)]
    size = 2 * args.kv_heads * args.chunk * args.head_dim * args.dtype_bytes
    return {"tokens": args.tokens, "chunk": args.chunk, "layers": args.layers, "group": args.group,
            "sub_period": args.sub_period, "chunks": chunks, "groups": groups, "record_size": size,
            "records": chunks * args.layers, "read_bytes": size * args.sub_period}


def _write_object(root: Path, shape: dict, seed: int) -> Path:
    store = RecordStore(CacheServerConfig(root=root, dram_cache_bytes=0))
    key = ObjectKey(PREFIX_ID, LAYOUT)
    if not store.list(PREFIX_ID):
        size, rng = shape["record_size"], random.Random(seed)
        regions = [(f"kv/G{i}", shape["chunks"] * g, size) for i, g in enumerate(shape["groups"])]
        writer = store.begin_put(key, regions, b"bench")
        block = rng.randbytes(size * 64)
        for name, count, _ in regions:
            for first in range(0, count, 64):
                n = min(64, count - first)
                writer.write(name, first, block[: n * size])
        store.commit(writer)
    return object_paths(root, key).data


def _drop_from_page_cache(path: Path) -> float:
    """Evict ``path`` from the page cache; return the fraction of its pages still resident."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return _resident(path)


def _resident(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache.

    Residency comes from ``mincore(2)`` over a private mapping of the file (never touched, so
    it reports the page cache's pages of the file).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    anchor = ctypes.c_char.from_buffer(mapped)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec):
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        del anchor
        mapped.close()
    return sum(v & 1 for v in vec) / pages


def _plans(shape: dict, fraction: float, args: argparse.Namespace, round_: int) -> list[list[Request]]:
    """Repeats of one selection: each a list of Fetch reads (one per group and sub-period).

    Random chunks, different in every round (``round_``), the same for both ways of a round.
    """
    rng = random.Random(f"{args.seed}-{fraction}-{round_}")
    m = shape["chunks"]
    count = max(1, math.ceil(fraction * m))
    bytes_per = count * shape["layers"] * shape["record_size"]
    repeats = max(1, round(args.target_mb * 1e6 / bytes_per))
    plans = []
    for _ in range(repeats):
        chunks = sorted(rng.sample(range(m), count))
        reads = []
        for group, g in enumerate(shape["groups"]):
            for first in range(0, g, shape["sub_period"]):
                layers = range(first, min(first + shape["sub_period"], g))
                reads.append((f"kv/G{group}", [j * g + k for j in chunks for k in layers]))
        plans.append(reads)
    return plans


# -- reading ---------------------------------------------------------------------------------

def _summary(total_bytes: int, records: int, seconds: float, latencies: list[float],
             stats: dict | None = None) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    out = {"bytes": total_bytes, "seconds": seconds, "gbps": total_bytes / seconds / 1e9,
           "records_per_s": records / seconds, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
           "mean_ms": statistics.fmean(ordered) * 1e3, "requests": len(ordered)}
    if stats is not None:
        out["read_amplification"] = (stats["bytes_read_from_disk"] / stats["bytes_requested_from_disk"]
                                     if stats["bytes_requested_from_disk"] else None)
        out["dram_hits"] = stats.get("dram_hits", 0)
    return out


async def _read_raw(root: Path, plans: list[list[Request]], args: argparse.Namespace) -> dict:
    store = RecordStore(CacheServerConfig(root=root, dram_cache_bytes=0))
    if not store.direct_io:
        print("warning: O_DIRECT unavailable here; raw reads go through the page cache")
    total = records = 0
    latencies: list[float] = []
    elapsed = 0.0
    helpers = None
    if args.read_processes:
        helpers = ReadProcesses(args.read_processes, max(1, args.read_threads // args.read_processes),
                                HELPER_SLOTS, DISK_BYTES_PER_PAYLOAD_BYTE * args.batch_bytes)
        helpers.start()
        await helpers.ready()
    with contextlib.ExitStack() as cleanup, store.open_object(ObjectKey(PREFIX_ID, LAYOUT)) as reader, \
            ThreadPoolExecutor(args.read_threads) as pool:
        if helpers is not None:
            cleanup.callback(helpers.close)
        assembler = BatchAssembler(reader, DramCache(0), ReadBuffers(4 * args.batch_bytes),
                                   store.counters)
        session = FetchSession(reader, assembler, pool, store.counters, args.batch_bytes,
                               max_inflight_bytes=args.inflight_bytes, helpers=helpers)
        batches = session.responses()
        tags = iter(range(1, 1 << 62))
        for reads in plans:
            start = time.perf_counter()
            sent = {}
            for region, indices in reads:
                tag = next(tags)
                sent[tag] = time.perf_counter()
                session.submit(tag, region, indices, 0)
            while sent:
                batch = await anext(batches)
                total += len(batch.wire) - batch.data_offset
                records += len(batch.indices)
                if batch.done:
                    latencies.append(time.perf_counter() - sent.pop(batch.tag))
            elapsed += time.perf_counter() - start
        await batches.aclose()
    stats = store.counters.values()
    summary = _summary(total, records, elapsed, latencies, stats)
    summary["direct_io"] = store.direct_io and stats.get("buffered_reads", 0) == 0
    return summary


@contextlib.contextmanager
def _server(root: Path, args: argparse.Namespace, dram_bytes: int):
    """A cache server process on ``root``; yields its address; stops it with SIGTERM."""
    port_file = root.parent / f"port-{dram_bytes}"
    port_file.unlink(missing_ok=True)
    log = open(root.parent / f"server-{dram_bytes}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "contiguouskv.cache_server", "--root", str(root), "--port", "0",
         "--port-file", str(port_file), "--dram-cache-bytes", str(dram_bytes),
         "--max-batch-bytes", str(args.batch_bytes), "--max-inflight-bytes", str(args.inflight_bytes),
         "--read-threads", str(args.read_threads), "--read-processes", str(args.read_processes)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cache server did not start; see {log.name}")
            time.sleep(0.05)
        yield f"127.0.0.1:{int(port_file.read_text())}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _read_grpc_process(address: str, plans: list[list[Request]], args: argparse.Namespace,
                       warm: bool) -> dict:
    """Run the gRPC client in a separate process; returns its summary."""
    job = {"address": address, "plans": plans, "batch_bytes": args.batch_bytes,
           "decoder": args.decoder, "warm": warm, "streams": args.streams}
    done = subprocess.run([sys.executable, "-m", "contiguouskv.bench.storage", "--client"],
                          input=json.dumps(job).encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench client failed:\n{done.stderr.decode(errors='replace')}")
    return json.loads(done.stdout)


async def _client(job: dict) -> dict:
    """The client process: one Fetch stream, the plans read one after another."""
    options = [("grpc.max_receive_message_length", 64 << 20), *BULK_RECEIVE_OPTIONS]
    decode = decode_fetch_response if job["decoder"] == "raw" else pb.FetchResponse.FromString
    async with grpc.aio.insecure_channel(job["address"], options=options) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        fetch = channel.stream_stream("/contiguouskv.v1.CacheService/Fetch",
                                      request_serializer=pb.FetchRequest.SerializeToString,
                                      response_deserializer=decode)
        calls = [fetch() for _ in range(job["streams"])]
        for call in calls:
            await call.write(pb.FetchRequest(open=pb.FetchOpen(
                prefix_id=PREFIX_ID, layout=LAYOUT, max_batch_bytes=job["batch_bytes"])))
        tags = iter(range(1, 1 << 62))

        async def drain(call: grpc.aio.StreamStreamCall, sent: dict[int, float]) -> tuple[int, int, list[float]]:
            total, records, lat = 0, 0, []
            while sent:
                message = await call.read()
                if message.error_code:
                    raise RuntimeError(f"request {message.tag}: {message.error_message}")
                total += len(message.data)
                records += len(message.indices)
                if message.done:
                    lat.append(time.perf_counter() - sent.pop(message.tag))
            return total, records, lat

        async def one(reads: Sequence[Sequence]) -> tuple[int, int, list[float]]:
            sent: list[dict[int, float]] = [{} for _ in calls]
            for k, (region, indices) in enumerate(reads):
                tag = next(tags)
                sent[k % len(calls)][tag] = time.perf_counter()
                await calls[k % len(calls)].write(pb.FetchRequest(read=pb.FetchRead(
                    tag=tag, region=region, indices=indices)))
            parts = await asyncio.gather(*(drain(c, s) for c, s in zip(calls, sent)))
            return (sum(p[0] for p in parts), sum(p[1] for p in parts),
                    [x for p in parts for x in p[2]])

        if job["warm"]:
            for reads in job["plans"]:
                await one(reads)
        before = await stub.GetStats(pb.GetStatsRequest())
        total = records = 0
        latencies: list[float] = []
        start = time.perf_counter()
        for reads in job["plans"]:
            t, r, lat = await one(reads)
            total, records, latencies = total + t, records + r, latencies + lat
        elapsed = time.perf_counter() - start
        after = await stub.GetStats(pb.GetStatsRequest())
        for call in calls:
            call.cancel()
    stats = {name: getattr(after, name) - getattr(before, name)
             for name in ("bytes_read_from_disk", "bytes_requested_from_disk", "dram_hits")}
    summary = _summary(total, records, elapsed, latencies, stats)
    summary["direct_io"] = after.direct_io and after.buffered_reads == 0
    return summary


# -- report ----------------------------------------------------------------------------------

def _report(shape: dict, resident: float, fractions: list[float], rounds: dict, dram: dict) -> dict:
    rows = []
    for f in fractions:
        runs = rounds[f]
        ratios = [run["grpc"]["gbps"] / run["raw"]["gbps"] for run in runs]
        raw, grpc = (_median_run([run[way] for run in runs]) for way in ("raw", "grpc"))
        amplification = {run["grpc"]["read_amplification"] for run in runs}
        rows.append({
            "selection": f, "raw_gbps": raw["gbps"], "grpc_gbps": grpc["gbps"],
            "dram_gbps": dram[f]["gbps"], "grpc_over_raw": statistics.median(ratios),
            "grpc_over_raw_rounds": ratios,
            "read_amplification": amplification.pop() if len(amplification) == 1 else sorted(amplification),
            "raw_read_amplification": max(run["raw"]["read_amplification"] for run in runs),
            "raw": raw, "grpc": grpc, "dram": dram[f], "rounds": runs,
        })
    direct = all(run[way]["direct_io"] for f in fractions for run in rounds[f] for way in ("raw", "grpc"))
    return {"shape": shape, "page_cache_resident_fraction": resident, "direct_io": direct,
            "rounds": len(rounds[fractions[0]]),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "loadavg_at_end": os.getloadavg()},
            "selections": rows}


def _median_run(runs: list[dict]) -> dict:
    """The run of median GB/s (the lower middle one for an even count), so its latencies match."""
    return sorted(runs, key=lambda run: run["gbps"])[(len(runs) - 1) // 2]


def _print(report: dict) -> None:
    s = report["shape"]
    print(f"shape: {s['tokens']} tokens, c={s['chunk']}, {s['layers']} layers, "
          f"{s['record_size'] // 1024} KiB records, {s['read_bytes'] // 1024} KiB per sub-period read; "
          f"O_DIRECT: {report['direct_io']}; page-cache resident after all reads: "
          f"{report['page_cache_resident_after']:.1%}")
    print(f"raw and grpc: the round of median GB/s out of {report['rounds']} side-by-side rounds; "
          f"dram: one warm run")
    head = f"{'sel':>5} {'way':>5} {'GB/s':>6} {'rec/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'amp':>5}"
    print(head)
    print(f"(load average at the end: {report['machine']['loadavg_at_end'][0]:.2f} on "
          f"{report['machine']['cpus']} CPUs: other work on this machine skews these numbers)")
    for row in report["selections"]:
        for way in ("raw", "grpc", "dram"):
            r = row[way]
            amp = r.get("read_amplification")
            print(f"{row['selection']:>5.0%} {way:>5} {r['gbps']:>6.2f} {r['records_per_s']:>8.0f} "
                  f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {amp if amp is None else round(amp, 3)!s:>5}")
        rounds = " ".join(f"{x:.2f}" for x in row["grpc_over_raw_rounds"])
        print(f"{'':>5} grpc/raw = {row['grpc_over_raw']:.2f} (rounds: {rounds})")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m contiguouskv.bench.storage`` (``--client`` is the internal client process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--client"]:
        keep_freed_buffers(os.environ)  # as the compute server does
        print(json.dumps(run_async(_client(json.loads(sys.stdin.read())))))
        return 0
    parser = argparse.ArgumentParser(prog="contiguouskv bench storage", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
