"""``contiguouskv bench storage``: the storage node's read path, from disk and from DRAM, over each data path.

One run writes a prefix-sized object of random records in the ``contiguous`` layout's shape
(default ``kvheavy``: 16K tokens, 16-token chunks, 28 layers in groups of 8, 4 KV heads of 128
dims, bf16, so one record = one chunk at one layer = 32 KiB and a sub-period of 4 layers = one
128 KiB coalesced read), drops it from the page cache and checks that none of it is resident, then
reads random selections of chunks (default 5, 10, 25 and 100 %) several ways:

- ``raw``: the server's own read path (fetch session, batch assembler, read helpers) in this
  process, the ceiling of what the disk gives the server;
- for each ``--path`` (``grpc``: record bytes in Fetch responses; ``shm``: the shared-memory plane
  of a co-located server, only descriptors over gRPC; ``auto``: shm where the plane opens) and each
  ``--streams`` count: a cache server process read by a separate client process over that many
  Fetch streams, from disk (``source`` disk) and from a warm DRAM cache (``source`` dram).

The client does what the compute server does with what arrives: on the shared-memory path it checks
every record's CRC-32 against the descriptor before counting it (records usable by the model), then
releases the slot. CPU seconds per GB are counted on both sides (client process; server process and
its read helpers, from ``/proc``) over the timed reads only.

A selection asks, like the compute server, one Fetch read per (group, sub-period): the chunk-major
records of the chosen chunks at that sub-period's layers, all reads of one selection at once.

The machine is shared and noisy, so the disk ways are measured side by side in ``--rounds`` rounds
(default 3): each round reads fresh random selections every way, one right after the other,
rotating which goes first. A round's ratio way/raw compares reads of the same bytes made under the
same conditions; each row gives its way's round of median GB/s and the median of the rounds' ratios
(``over_raw``), with every round's values in the JSON. ``--json FILE`` writes one row per (selection,
path, source, streams) with ``gbps``, ``raw_gbps`` (disk rows), ``over_raw``, ``cpu_s_per_gb``
(both sides), ``client_cpu_s_per_gb``, ``server_cpu_s_per_gb``, ``records_per_s``, ``p50_ms``,
``p99_ms``, and a summary of the side-by-side ratios. No torch: records are random bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from contiguouskv.cache_server.assemble import BatchAssembler
from contiguouskv.cache_server.buffers import ReadBuffers
from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.cache_server.dram_cache import DramCache
from contiguouskv.cache_server.fetch import DISK_BYTES_PER_PAYLOAD_BYTE, FetchSession
from contiguouskv.cache_server.keys import ObjectKey, object_paths
from contiguouskv.cache_server.read_process import ENGINES as READ_ENGINES, ReadProcesses
from contiguouskv.cache_server.server import HELPER_SLOTS
from contiguouskv.cache_server.store import RecordStore
from contiguouskv.common.fetch_wire import BULK_RECEIVE_OPTIONS, decode_fetch_response
from contiguouskv.common.malloc import keep_freed_buffers
from contiguouskv.compute_server.cachenet.shm_plane import PlaneStreamState, ShmPlane
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
    a("--selections", default="0.05,0.1,0.25,1.0", help="fractions of chunks to read (default 0.05,0.1,0.25,1.0)")
    a("--target-mb", type=float, default=600.0, help="read about this many MB per selection and way")
    a("--batch-bytes", type=int, default=1 << 20, help="payload per Fetch response (1 MiB)")
    a("--inflight-bytes", type=int, default=16 << 20, help="server in-flight bytes per stream")
    a("--read-threads", type=int, default=16, help="server read threads (16)")
    a("--read-processes", type=int, default=1,
      help="helper processes making the reads, sharing the read threads (1; 0 = in-process threads)")
    a("--read-engine", choices=READ_ENGINES, default="aio",
      help="how the helpers read O_DIRECT files, for the raw way and the servers (aio: native AIO; threads)")
    a("--path", default="grpc,shm",
      help="data paths to measure, comma-separated: grpc, shm (co-located shared memory), auto (grpc,shm)")
    a("--streams", default="1,4", help="Fetch streams per client, comma-separated counts, reads spread over them (1,4)")
    a("--shm-slots", type=int, default=32, help="slots of the client's shared buffer (32)")
    a("--shm-slot-bytes", type=int, default=4 << 20,
      help="bytes per slot, the shared-memory path's batch size (4 MiB, the compute server's default)")
    a("--decoder", choices=("raw", "protobuf"), default="raw",
      help="client parsing of Fetch responses (raw: zero-copy payload view)")
    a("--workdir", type=Path, help="where to write the object (a temp dir on this disk by default)")
    a("--rounds", type=int, default=3,
      help="rounds of every disk way side by side (3); medians are reported")
    a("--seed", type=int, default=0, help="random seed of the selections (default 0)")
    a("--json", type=Path, help="also write the results to this file")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints a table; returns 0 (1 if the page cache could not be bypassed)."""
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    keep_freed_buffers(os.environ)  # the raw way gets the servers' malloc settings too
    shape = _shape(args)
    fractions = [float(f) for f in args.selections.split(",")]
    ways = _ways(args)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="ckv-bench-", dir=os.getcwd())))
        root = Path(workdir) / "store"
        # a short path: Unix socket paths are limited to ~100 bytes, wherever the workdir is
        socket_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ckv-shm-")))
        data_path = _write_object(root, shape, args.seed)
        resident = _drop_from_page_cache(data_path)
        print(f"object: {shape['records']} records of {shape['record_size']} B "
              f"({shape['records'] * shape['record_size'] / 1e9:.2f} GB) at {data_path}; "
              f"page-cache resident after drop: {resident:.1%}")
        rounds: dict[float, list[dict]] = {f: [] for f in fractions}
        with _server(root, args, 0, socket_dir / "disk.sock") as server:
            for r in range(args.rounds):
                for f in fractions:
                    plans = _plans(shape, f, args, r)
                    order = ["raw", *ways]
                    order = order[r % len(order):] + order[: r % len(order)]
                    rounds[f].append({way: asyncio.run(_read_raw(root, plans, args)) if way == "raw"
                                      else _read_client_process(server, plans, args, way, warm=False)
                                      for way in order})
        dram: dict[float, dict] = {}
        with _server(root, args, shape["records"] * shape["record_size"] * 2, socket_dir / "dram.sock") as server:
            for f in fractions:
                plans = _plans(shape, f, args, 0)
                dram[f] = {way: _read_client_process(server, plans, args, way, warm=True) for way in ways}
        # O_DIRECT reads leave no page of the file in the page cache: none after every way ran
        # proves that every disk way read from the disk (the dram ways' warm-up too).
        resident_after = _resident(data_path)
        report = _report(shape, resident, fractions, ways, rounds, dram)
        report["page_cache_resident_after"] = resident_after
        report["shm_buffer"] = {"slots": args.shm_slots, "slot_bytes": args.shm_slot_bytes}
        report["read_engine"] = args.read_engine
        report["helper_engines"] = sorted({e for f in fractions for run in rounds[f] for e in run["raw"]["engines"]})
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["direct_io"] and resident == 0.0 and resident_after == 0.0 else 1


def _ways(args: argparse.Namespace) -> list[str]:
    """The client ways, ``PATH/STREAMS`` (e.g. ``grpc/1``, ``shm/4``), in a fixed order."""
    paths = [p.strip() for p in args.path.split(",") if p.strip()]
    if not paths or not set(paths) <= {"grpc", "shm", "auto"}:
        raise SystemExit(f"--path: {args.path!r}: give grpc, shm and/or auto")
    try:
        streams = [int(n) for n in args.streams.split(",")]
    except ValueError:
        raise SystemExit(f"--streams: {args.streams!r} is not a list of counts") from None
    if not streams or min(streams) < 1:
        raise SystemExit("--streams: counts must be at least 1")
    return [f"{p}/{n}" for p in dict.fromkeys(paths) for n in dict.fromkeys(streams)]


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
                                HELPER_SLOTS, DISK_BYTES_PER_PAYLOAD_BYTE * args.batch_bytes, args.read_engine)
        helpers.start()
        await helpers.ready()
    engines = helpers.engines if helpers is not None else ["threads (in process)"]
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
        cpu = process_cpu_s(os.getpid())  # this process and its read helpers
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
        cpu = process_cpu_s(os.getpid()) - cpu
        await batches.aclose()
    stats = store.counters.values()
    summary = _summary(total, records, elapsed, latencies, stats)
    summary["cpu_s_per_gb"] = cpu / (total / 1e9)
    summary["direct_io"] = store.direct_io and stats.get("buffered_reads", 0) == 0
    summary["engines"] = engines
    return summary


@dataclasses.dataclass(frozen=True)
class _Server:
    address: str
    pid: int
    socket: str


@contextlib.contextmanager
def _server(root: Path, args: argparse.Namespace, dram_bytes: int, socket_path: Path) -> Iterator[_Server]:
    """A cache server process on ``root`` with a shared-memory socket; stopped with SIGTERM."""
    port_file = root.parent / f"port-{dram_bytes}"
    port_file.unlink(missing_ok=True)
    log = open(root.parent / f"server-{dram_bytes}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "contiguouskv.cache_server", "--root", str(root), "--port", "0",
         "--port-file", str(port_file), "--dram-cache-bytes", str(dram_bytes),
         "--max-batch-bytes", str(args.batch_bytes), "--max-inflight-bytes", str(args.inflight_bytes),
         "--read-threads", str(args.read_threads), "--read-processes", str(args.read_processes),
         "--read-engine", args.read_engine,
         "--shm-socket", str(socket_path)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cache server did not start; see {log.name}")
            time.sleep(0.05)
        yield _Server(f"127.0.0.1:{int(port_file.read_text())}", proc.pid, str(socket_path))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _read_client_process(server: _Server, plans: list[list[Request]], args: argparse.Namespace, way: str,
                         warm: bool) -> dict:
    """Run the client of ``way`` (``PATH/STREAMS``) in a separate process; returns its summary."""
    path, streams = way.split("/")
    job = {"address": server.address, "plans": plans, "batch_bytes": args.batch_bytes, "decoder": args.decoder,
           "warm": warm, "streams": int(streams), "path": path, "socket": server.socket,
           "server_pid": server.pid, "slots": args.shm_slots, "slot_bytes": args.shm_slot_bytes}
    done = subprocess.run([sys.executable, "-m", "contiguouskv.bench.storage", "--client"],
                          input=json.dumps(job).encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench client failed:\n{done.stderr.decode(errors='replace')}")
    return json.loads(done.stdout)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live children (the read helpers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # fields after the command name: state, ppid, ..., utime (14th), stime (15th)
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _client(job: dict) -> dict:
    """The client process: ``streams`` Fetch streams on one path, the plans read one after another."""
    options = [("grpc.max_receive_message_length", 64 << 20), *BULK_RECEIVE_OPTIONS]
    decode = decode_fetch_response if job["decoder"] == "raw" or job["path"] != "grpc" else pb.FetchResponse.FromString
    plane = None
    if job["path"] != "grpc":
        try:
            plane = ShmPlane.connect(job["socket"], job["slots"], job["slot_bytes"])
        except OSError:
            if job["path"] == "shm":
                raise
    async with grpc.aio.insecure_channel(job["address"], options=options) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        fetch = channel.stream_stream("/contiguouskv.v1.CacheService/Fetch",
                                      request_serializer=pb.FetchRequest.SerializeToString,
                                      response_deserializer=decode)
        calls = [fetch() for _ in range(job["streams"])]
        states = [plane.stream() if plane is not None else None for _ in calls]
        for call, state in zip(calls, states):
            await call.write(pb.FetchRequest(open=pb.FetchOpen(
                prefix_id=PREFIX_ID, layout=LAYOUT,
                max_batch_bytes=plane.slot_bytes if plane is not None else job["batch_bytes"], shm_plane=plane.id if plane is not None else "", shm_stream=state.id if state is not None else 0)))
        tags = iter(range(1, 1 << 62))

        async def drain(call: grpc.aio.StreamStreamCall, state: PlaneStreamState | None,
                        sent: dict[int, float]) -> tuple[int, int, int, list[float]]:
            total = records = via_shm = 0
            lat: list[float] = []
            while sent:
                message = await call.read()
                if message.error_code:
                    raise RuntimeError(f"request {message.tag}: {message.error_message}")
                if getattr(message, "shm", None) is not None:
                    assert state is not None
                    size = 0
                    for batch in state.receive(message):  # every record's CRC-32 checked: usable
                        size += len(batch.data)
                        assert batch.lease is not None
                        batch.lease.release()
                    via_shm += size
                else:
                    size = len(message.data)
                total += size
                records += len(message.indices)
                if message.done:
                    lat.append(time.perf_counter() - sent.pop(message.tag))
            return total, records, via_shm, lat

        async def one(reads: Sequence[Sequence]) -> tuple[int, int, int, list[float]]:
            sent: list[dict[int, float]] = [{} for _ in calls]
            for k, (region, indices) in enumerate(reads):
                tag = next(tags)
                sent[k % len(calls)][tag] = time.perf_counter()
                await calls[k % len(calls)].write(pb.FetchRequest(read=pb.FetchRead(
                    tag=tag, region=region, indices=indices)))
            parts = await asyncio.gather(*(drain(c, st, s) for c, st, s in zip(calls, states, sent)))
            return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                    [x for p in parts for x in p[3]])

        if job["warm"]:
            for reads in job["plans"]:
                await one(reads)
        before = await stub.GetStats(pb.GetStatsRequest())
        total = records = via_shm = 0
        latencies: list[float] = []
        server_cpu, client_cpu = process_cpu_s(job["server_pid"]), time.process_time()
        in_place = sum(state.bytes_in_place for state in states if state is not None)
        start = time.perf_counter()
        for reads in job["plans"]:
            t, r, v, lat = await one(reads)
            total, records, via_shm, latencies = total + t, records + r, via_shm + v, latencies + lat
        elapsed = time.perf_counter() - start
        server_cpu, client_cpu = process_cpu_s(job["server_pid"]) - server_cpu, time.process_time() - client_cpu
        in_place = sum(state.bytes_in_place for state in states if state is not None) - in_place
        after = await stub.GetStats(pb.GetStatsRequest())
        for call, state in zip(calls, states):
            call.cancel()
            if state is not None:
                state.finish()
    if plane is not None:
        plane.close()
    stats = {name: getattr(after, name) - getattr(before, name)
             for name in ("bytes_read_from_disk", "bytes_requested_from_disk", "dram_hits")}
    summary = _summary(total, records, elapsed, latencies, stats)
    summary["direct_io"] = after.direct_io and after.buffered_reads == 0
    summary["shm_fraction"] = via_shm / total if total else 0.0
    summary["in_place_fraction"] = in_place / total if total else 0.0  # DRAM hits read in the server's arena
    gigabytes = total / 1e9
    summary["client_cpu_s_per_gb"] = client_cpu / gigabytes
    summary["server_cpu_s_per_gb"] = server_cpu / gigabytes
    summary["cpu_s_per_gb"] = (client_cpu + server_cpu) / gigabytes
    return summary


# -- report ----------------------------------------------------------------------------------

def _report(shape: dict, resident: float, fractions: list[float], ways: list[str], rounds: dict,
            dram: dict) -> dict:
    rows = []
    for f in fractions:
        runs = rounds[f]
        raw = _median_run([run["raw"] for run in runs])
        for way in ways:
            path, streams = way.split("/")
            ratios = [run[way]["gbps"] / run["raw"]["gbps"] for run in runs]
            disk = _median_run([run[way] for run in runs])
            rows.append({"selection": f, "path": path, "source": "disk", "streams": int(streams),
                         **_row_numbers(disk), "raw_gbps": raw["gbps"], "over_raw": statistics.median(ratios),
                         "over_raw_rounds": ratios, "raw_cpu_s_per_gb": raw["cpu_s_per_gb"],
                         "read_amplification": disk["read_amplification"], "rounds": [run[way] for run in runs]})
            rows.append({"selection": f, "path": path, "source": "dram", "streams": int(streams),
                         **_row_numbers(dram[f][way]), "dram_hits": dram[f][way]["dram_hits"]})
    direct = all(run[way]["direct_io"] for f in fractions for run in rounds[f] for way in ["raw", *ways])
    return {"shape": shape, "page_cache_resident_fraction": resident, "direct_io": direct,
            "rounds": len(rounds[fractions[0]]), "ways": ways,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "loadavg_at_end": os.getloadavg()},
            "rows": rows, "summary": _ratios(rows),
            "raw": {str(f): [run["raw"] for run in rounds[f]] for f in fractions}}


def _row_numbers(run: dict) -> dict:
    keys = ("gbps", "records_per_s", "p50_ms", "p99_ms", "cpu_s_per_gb", "client_cpu_s_per_gb",
            "server_cpu_s_per_gb", "shm_fraction", "in_place_fraction", "bytes")
    return {k: run[k] for k in keys}


def _ratios(rows: list[dict]) -> list[dict]:
    """Side-by-side ratios per selection: shared memory against gRPC bytes, and N streams against 1."""
    out = []
    by = {(r["selection"], r["path"], r["source"], r["streams"]): r for r in rows}
    for (f, path, source, streams), row in by.items():
        if path == "shm" and (f, "grpc", source, streams) in by:
            grpc_row = by[(f, "grpc", source, streams)]
            out.append({"selection": f, "source": source, "streams": streams, "compare": "shm/grpc",
                        "gbps_ratio": row["gbps"] / grpc_row["gbps"],
                        "cpu_ratio": row["cpu_s_per_gb"] / grpc_row["cpu_s_per_gb"]})
        if streams > 1 and (f, path, source, 1) in by:
            one = by[(f, path, source, 1)]
            out.append({"selection": f, "source": source, "path": path, "compare": f"{streams}/1 streams",
                        "gbps_ratio": row["gbps"] / one["gbps"],
                        "cpu_ratio": row["cpu_s_per_gb"] / one["cpu_s_per_gb"]})
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run of median GB/s (the lower middle one for an even count), so its latencies match."""
    return sorted(runs, key=lambda run: run["gbps"])[(len(runs) - 1) // 2]


def _print(report: dict) -> None:
    s = report["shape"]
    print(f"shape: {s['tokens']} tokens, c={s['chunk']}, {s['layers']} layers, "
          f"{s['record_size'] // 1024} KiB records, {s['read_bytes'] // 1024} KiB per sub-period read; "
          f"O_DIRECT: {report['direct_io']}; page-cache resident after all reads: "
          f"{report['page_cache_resident_after']:.1%}; helpers read by {'; '.join(report['helper_engines'])}")
    print(f"disk rows: the round of median GB/s out of {report['rounds']} side-by-side rounds with raw; "
          f"dram rows: one warm run. CPU s/GB: client + server (+ read helpers)")
    print(f"(load average at the end: {report['machine']['loadavg_at_end'][0]:.2f} on "
          f"{report['machine']['cpus']} CPUs, read threads blocked on the disk included: "
          f"beyond those, other work on this machine skews these numbers)")
    print(f"{'sel':>5} {'source':>6} {'path':>5} {'str':>3} {'GB/s':>6} {'/raw':>5} {'cpu s/GB':>8} "
          f"{'client':>6} {'server':>6} {'shm %':>5} {'inpl %':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for r in report["rows"]:
        over = f"{r['over_raw']:.2f}" if "over_raw" in r else ""
        print(f"{r['selection']:>5.0%} {r['source']:>6} {r['path']:>5} {r['streams']:>3} {r['gbps']:>6.2f} "
              f"{over:>5} {r['cpu_s_per_gb']:>8.2f} {r['client_cpu_s_per_gb']:>6.2f} "
              f"{r['server_cpu_s_per_gb']:>6.2f} {r['shm_fraction']:>5.0%} {r['in_place_fraction']:>6.0%} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f}")
    for c in report["summary"]:  # what is compared, and what the two sides share
        what = f"{c['compare']}, {c['streams']} stream(s)" if "streams" in c else f"{c['compare']}, {c['path']}"
        print(f"{c['selection']:>5.0%} {c['source']:>6} {what:>24}: GB/s x{c['gbps_ratio']:.2f}, "
              f"CPU/GB x{c['cpu_ratio']:.2f}")


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
