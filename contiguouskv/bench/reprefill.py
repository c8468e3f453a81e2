"""``contiguouskv bench``: every policy side by side, in one run, on the same stored prefixes.

Starts a cache server and a compute server as separate processes, registers random-token prefixes,
then measures Re-Prefill per policy and budget, *cold* (DRAM cache off, O_DIRECT reads: nothing
from memory; the compute server keeps no identification data, so every request reads its own) and
*warm* (a skewed stream of queries over several prefixes with a DRAM budget smaller than their data,
cache server restarted per policy so every policy starts from the same state; the compute server's
identification cache at its default, filled by the warm-up pass). Rows carry ``ident_wait_ms``: the
time the compute path blocked on identification data, the part of the reads speculation did not hide.
The physical floor of each row (``floor_ms``) is max(``io_floor_ms``: bytes it read / raw O_DIRECT
disk bandwidth at its request size measured in this run on the same files, ``resident_compute_ms``:
the same query over the same prefix K/V held resident, measured by the server right after each
request with ``measure_floor``, off the TTFT clock); ``ttft_over_floor`` is then the system's
overhead. ``breakdown_ms`` splits TTFT into waits for K/V records and for identification data, the
resident compute and the rest (selection scoring, record decoding and staging, Python). The old
floor, max(io floor, the server's compute time), is kept as ``overlap_floor_ms``. A row during
which the cache server read through the page cache is marked (``page_cache_reads``) and left out of
the speedups. With several ``--path`` values each path has its own compute server; the paths take
turns request by request, and every cell is measured with the servers started in both orders (the
process started second ran slower here, whatever it served). ``--score-window 0,8`` does the same
for the per-layer policies' scoring window: one compute server per (path, window).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from contiguouskv import launch
from contiguouskv.bench.disk import raw_read_gbps
from contiguouskv.bench.plots import plot_reprefill
from contiguouskv.bench.policies import PRIMARY_LAYOUT, extra_layouts, resolve
from contiguouskv.bench.policies import cells as policy_cells
from contiguouskv.client import ContiguousKVClient, ModelInfo, PolicyInfo
from contiguouskv.progress import Progress
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc



SPENT = ("selection", "staging", "model", "other")  # the response's split of a request's compute time
LOADING = "loading"
"""``--policies`` default without ``--full``: every served policy that loads KV."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:kvheavy", help="model (default random:kvheavy)")
    parser.add_argument("--prefix-tokens", default="16384",
                        help="tokens per prefix (default 16384); a comma-separated list (4096,16384,65536) runs "
                        "every length in one run, with a TTFT-and-bytes-against-length plot")
    parser.add_argument("--query-tokens", type=int, default=64, help="tokens per query (default 64)")
    parser.add_argument("--budgets", help="comma-separated fractions (default 0.05; with --full 0.05,0.1,0.25,0.5)")
    parser.add_argument("--policies",
                        help="comma-separated policies, or all (default: every policy the compute server serves "
                        "that loads KV, i.e. all but recompute, whose prefill of the whole prefix takes minutes on a "
                        "CPU; with --full all)")
    parser.add_argument("--repeats", type=int, help="cold runs per policy and budget (default 2; with --full 3)")
    parser.add_argument("--warm-prefixes", type=int,
                        help="prefixes in the warm stream; 0 = no warm (default 0; with --full 3)")
    parser.add_argument("--warm-queries", type=int, default=12, help="queries per policy in the warm stream")
    parser.add_argument("--warm-dram-fraction", type=float, default=0.5,
                        help="DRAM cache budget as a fraction of each policy's hot set: the K/V it selects over the "
                        "warm stream's distinct prefixes (default 0.5, so every policy must evict)")
    parser.add_argument("--period", type=int, help="layers per period (server default 8)")
    parser.add_argument("--sub-period", type=int, help="layers per fetch run (server default 4)")
    parser.add_argument("--dtype", default="auto",
                        help="compute dtype: auto (default: bfloat16 on a GPU, float32 on a CPU, which has no fast "
                        "bfloat16 matmuls), float32, bfloat16, float16")
    parser.add_argument("--kv-dtype", default="bfloat16",
                        help="dtype the prefix KV is stored and read in (default bfloat16, whatever the compute dtype)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--compute-threads", type=int,
                        help="torch threads of the compute server (default: 1 on machines with <= 4 cores, "
                        "else torch's default)")
    parser.add_argument("--workdir", type=Path, help="store directory (default: a temp dir under the current one; "
                        "must be a real disk for O_DIRECT)")
    parser.add_argument("--path", default="grpc",
                        help="data paths of the cold and warm rows, comma-separated: grpc (record bytes over gRPC), shm "
                        "(the co-located cache server's shared memory); e.g. grpc,shm measures both side by side")
    parser.add_argument("--score-window", default="",
                        help="the per-layer policies' scoring windows of the cold rows, comma-separated "
                        "(--score-window of the compute server; e.g. 0,8 measures every query token beside the "
                        "last 8, side by side like --path); default: the server's own")
    parser.add_argument("--seed", type=int, default=0, help="random seed of prefixes and queries (default 0)")
    parser.add_argument("--json", dest="json_path", type=Path, help="write results as JSON here")
    parser.add_argument("--plot", type=Path, help="write PNG plots into this directory")
    parser.add_argument("--full", action="store_true",
                        help="the whole sweep: every policy (recompute too), budgets 0.05,0.1,0.25,0.5, 3 repeats, a "
                        "warm stream over 3 prefixes; without it the defaults finish in about 5 minutes on a 2-core "
                        "CPU at 16K tokens (4.3 in the committed default run)")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="the GPU run: Qwen2.5-7B and 14B shapes, 16K and 32K prefixes, bf16, cuda, all policies; "
                        "with --device cpu a dry run of the same suite on the smallest shapes (random:tiny, "
                        "512-token prefixes, float32, one cold run per cell, no warm stream)")


@dataclass
class Row:
    policy: str
    layout: str
    selective: bool
    budget: float
    cache: str
    prefix_tokens: int
    query_tokens: int
    path: str = "grpc"
    score_window: int | None = None  # the scoring window the compute server reported
    ttft_ms: list[float] = field(default_factory=list)
    io_wait_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    ident_wait_ms: list[float] = field(default_factory=list)
    bytes_from_disk: int = 0
    bytes_from_dram: int = 0
    bytes_requested_from_disk: int = 0
    bytes_fetched: int = 0
    bytes_kv: int = 0
    bytes_identification: int = 0
    recall: float = -1.0
    bytes_shm: int = 0  # payload bytes the cache server placed in the compute server's shared memory
    page_cache_reads: int = 0  # reads the cache server made without O_DIRECT during the row
    resident_ms: list[float] = field(default_factory=list)  # the same query over resident K/V
    overhead_ms: list[float] = field(default_factory=list)  # TTFT - waits - resident compute
    spent_ms: dict[str, list[float]] = field(default_factory=dict)  # selection, staging, model, other
    hit_rate: list[float] = field(default_factory=list)  # predicted chunks the request then selected
    eviction_rule: str = ""  # warm rows: the cache server's DRAM eviction rule ("" cold: no DRAM cache)
    dram_budget_bytes: int = 0  # warm rows: the DRAM cache's budget
    layers: list[tuple[float, float]] = field(default_factory=list)

    def summary(self, gbps: dict[str, float], kv_request: str) -> dict[str, object]:
        runs = max(1, len(self.ttft_ms))
        disk = self.bytes_from_disk / runs
        ident = self.bytes_identification / runs
        io_floor_s = max(0.0, disk - ident) / (gbps[kv_request] * 1e9) + ident / (gbps["1MiB"] * 1e9)
        compute = statistics.median(self.compute_ms) if self.compute_ms else 0.0
        io_floor_ms = io_floor_s * 1e3
        resident = statistics.median(self.resident_ms) if self.resident_ms else compute
        floor_ms = max(io_floor_ms, resident)  # what the disk and the kernels allow
        overlap_floor_ms = max(io_floor_ms, compute)  # the old column: the server's own compute time
        p50 = statistics.median(self.ttft_ms)
        ident_wait = statistics.median(self.ident_wait_ms) if self.ident_wait_ms else 0.0
        io_wait = statistics.median(self.io_wait_ms) if self.io_wait_ms else 0.0
        return {
            "policy": self.policy, "layout": self.layout, "selective": self.selective, "budget": self.budget,
            "cache": self.cache, "path": self.path, "score_window": self.score_window,
            "eviction_rule": self.eviction_rule,
            "dram_budget_bytes": self.dram_budget_bytes,
            "prefix_tokens": self.prefix_tokens, "query_tokens": self.query_tokens,
            "ttft_ms_p50": p50, "ttft_ms_p95": _p95(self.ttft_ms),
            "bytes_from_disk": int(disk), "bytes_from_dram": int(self.bytes_from_dram / runs),
            "read_amplification": (self.bytes_from_disk / self.bytes_requested_from_disk
                                   if self.bytes_requested_from_disk else 1.0),
            "bytes_fetched": int(self.bytes_fetched / runs), "bytes_kv": int(self.bytes_kv / runs),
            "bytes_identification": int(ident), "bytes_shm": int(self.bytes_shm / runs),
            "floor_ms": floor_ms, "io_floor_ms": io_floor_ms, "resident_compute_ms": resident,
            "floor_sum_ms": io_floor_ms + resident, "ttft_over_floor": p50 / floor_ms if floor_ms else None,
            "overlap_floor_ms": overlap_floor_ms,
            "ttft_over_overlap_floor": p50 / overlap_floor_ms if overlap_floor_ms else None,
            "breakdown_ms": {"record_wait": io_wait - ident_wait, "ident_wait": ident_wait,
                             "resident_compute": resident,
                             "overhead": statistics.median(self.overhead_ms) if self.overhead_ms else None},
            # the request's own split of its compute time (medians; the response's Timings)
            "spent_ms": {name: statistics.median(values) for name, values in self.spent_ms.items()},
            "page_cache_reads": self.page_cache_reads,
            "io_wait_ms": statistics.median(self.io_wait_ms), "compute_ms": compute, "recall": self.recall,
            "ident_wait_ms": statistics.median(self.ident_wait_ms) if self.ident_wait_ms else 0.0,
            "ident_wait_share": (statistics.median(self.ident_wait_ms) / p50 if self.ident_wait_ms and p50 else 0.0),
            "prediction_hit_rate": statistics.median(self.hit_rate) if self.hit_rate else None,
        }


def _merged(rows: list[Row], more: list[Row]) -> list[Row]:
    """``rows`` with the runs of ``more`` added to the row of the same cell and path (or appended)."""
    key = lambda r: (r.policy, r.budget, r.cache, r.prefix_tokens, r.path, r.score_window, r.eviction_rule)  # noqa: E731
    by = {key(r): r for r in rows}
    out = list(rows)
    for r in more:
        into = by.get(key(r))
        if into is None:
            out.append(r)
            continue
        for name in ("ttft_ms", "io_wait_ms", "compute_ms", "ident_wait_ms", "resident_ms", "overhead_ms", "hit_rate"):
            getattr(into, name).extend(getattr(r, name))
        for name in ("bytes_from_disk", "bytes_from_dram", "bytes_requested_from_disk", "bytes_fetched", "bytes_kv",
                     "bytes_identification", "bytes_shm", "page_cache_reads"):
            setattr(into, name, getattr(into, name) + getattr(r, name))
        into.recall = into.recall if into.recall >= 0 else r.recall
    return out


OWN_RULES = {"full": "lru", "h2o": "lru", "impress": "impress"}
"""Each baseline's own DRAM cache rule in the warm runs (LRU for the loaders that have none of their
own, IMPRESS's frequency x important-fraction score for IMPRESS); every other policy's is ``attention``."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes(info: ModelInfo, prefix_tokens: int) -> int:
    """K+V bytes of one prefix in the stored dtype."""
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * prefix_tokens * DTYPE_BYTES[info.dtype]


def dram_budget(prefix_kv_bytes: int, distinct_prefixes: int, share: float, fraction: float) -> int:
    """``fraction`` of a policy's hot set: the ``share`` of K/V it selects, over the prefixes it sees."""
    return int(fraction * share * prefix_kv_bytes * distinct_prefixes)


def eta(elapsed_s: float, done: int, total: int) -> str:
    """`` (about 2m10s left)``: the mean time of the ``done`` cells times those left; empty before
    the first cell is done (nothing to estimate from) and after the last."""
    if done < 1 or done >= total:
        return ""
    left = round(elapsed_s / done * (total - done))
    return f" (about {f'{left // 60}m{left % 60:02d}s' if left >= 60 else f'{left}s'} left in this phase)"


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _stats(address: str) -> cache_pb2.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return cache_pb2_grpc.CacheServiceStub(channel).GetStats(cache_pb2.GetStatsRequest(), timeout=30)


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    """One bench run over one model and prefix length."""

    def __init__(self, args: argparse.Namespace, model: str, prefix_tokens: int, root: Path) -> None:
        self.args = args
        self.model = model
        self.prefix_tokens = prefix_tokens
        self.root = root
        self.requested = args.policies
        self.policies: list[PolicyInfo] = []
        self.budgets = [float(b) for b in args.budgets.split(",") if b]
        self.rng = random.Random(args.seed)
        self.prefixes: list[str] = []
        self.registration_s = 0.0  # wall time spent registering prefixes
        self.paths = [p for p in dict.fromkeys(x.strip() for x in args.path.split(",")) if p]
        if not self.paths or not set(self.paths) <= {"grpc", "shm"}:
            raise SystemExit(f"--path: {args.path!r}: give grpc and/or shm")
        windows = [w.strip() for w in args.score_window.split(",") if w.strip()]
        if not all(w.isdigit() for w in windows):
            raise SystemExit(f"--score-window: {args.score_window!r}: give whole numbers >= 0 (0: every query token)")
        self.windows: list[int | None] = list(dict.fromkeys(int(w) for w in windows)) or [None]
        self.variants: list[Variant] = [(p, w) for p in self.paths for w in self.windows]
        # Unix socket paths are limited to ~100 bytes: a short directory, wherever the workdir is
        self.socket = str(Path(tempfile.mkdtemp(prefix="ckv-shm-")) / "plane.sock")

    def _compute(self, cache_address: str, ident_cache: bool = True, path: str = "grpc",
                 window: int | None = None) -> launch.ServiceProcess:
        """A compute server; ``ident_cache=False`` makes every request read its identification data
        (cold), else hot prefixes keep it resident (the server's default). ``path`` shm reads the
        cache server's records through its shared-memory plane (``--data-path shm``); ``window``:
        its ``--score-window`` (None: its default)."""
        threads = self.args.compute_threads
        if threads is None:
            threads = 1 if (os.cpu_count() or 1) <= 4 else 0
        extra = ["--dtype", self.args.dtype, "--kv-dtype", self.args.kv_dtype, "--device", self.args.device,
                 "--threads", str(threads)]
        if not ident_cache:
            extra += ["--ident-cache-bytes", "0"]
        if path != "grpc":
            extra += ["--data-path", path, "--shm-socket", self.socket]
        if window is not None:
            extra += ["--score-window", str(window)]
        # the server's default max_prefix_tokens (32768) would refuse a longer bench prefix
        env = {"CKV_MAX_PREFIX_TOKENS": str(self.prefix_tokens)} if self.prefix_tokens > 32768 else None
        proc = launch.compute_server(self.model, cache_address, *extra, log_path=self.root / "compute.log", env=env)
        proc.wait_ready(timeout=900)
        return proc

    def _cache(self, dram_bytes: int, rule: str = "attention") -> launch.ServiceProcess:
        proc = launch.cache_server(self.root / "store", "--dram-cache-bytes", str(dram_bytes), "--eviction-rule", rule,
                                   "--shm-socket", self.socket, log_path=self.root / "cache.log")
        proc.wait_ready(timeout=120)
        return proc

    def _query(self) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(self.args.query_tokens)]

    def register(self, client: ContiguousKVClient, count: int) -> None:
        extra = extra_layouts(self.policies)
        while len(self.prefixes) < count:
            ids = [self.rng.randrange(self.vocab) for _ in range(self.prefix_tokens)]
            _progress(f"registering prefix {len(self.prefixes) + 1}/{count} ({self.prefix_tokens} tokens) ...")
            began = time.monotonic()
            with Progress(f"registering prefix {len(self.prefixes) + 1}/{count}"):  # drawn on a terminal only
                reg = client.register(token_ids=ids, extra_layouts=extra, timeout=7200) if extra else \
                    client.register(token_ids=ids, timeout=7200)
            self.registration_s += time.monotonic() - began
            self.prefixes.append(reg.prefix_id)

    def cells(self) -> list[tuple[PolicyInfo, float]]:
        by_name = {p.name: p for p in self.policies}
        return [(by_name[name], b) for name, b in policy_cells(self.policies, self.budgets)]

    def measure(self, cache: launch.ServiceProcess, clients: dict[Variant, ContiguousKVClient], label: str,
                prefixes: list[str], queries: int) -> list[Row]:
        """One row per cell and (data path, scoring window). With several (one compute server each)
        they take turns request by request, on the same queries, in rotating order, so that all see
        the same machine; the cache server's counters are read around every request."""
        rows = []
        cells = self.cells()
        paths = list(clients)
        began = time.monotonic()
        for i, (info, budget) in enumerate(cells, 1):
            policy = info.name
            _progress(f"{label} {i}/{len(cells)}: {policy} budget {budget:g} x {queries}"
                      + (f" over {' and '.join(_variant_label(v) for v in paths)}" if len(paths) > 1 else "")
                      + eta(time.monotonic() - began, i - 1, len(cells)))
            by_path = {path: Row(policy, info.layout, info.selective, budget, label, self.prefix_tokens,
                                 self.args.query_tokens, path[0], path[1]) for path in paths}
            with Progress(f"{label} {policy} {budget:g}", total=queries * len(paths)) as bar:
                for q in range(queries):
                    query, prefix = self._query(), prefixes[q % len(prefixes)]
                    for path in paths[q % len(paths):] + paths[: q % len(paths)]:
                        self._ask_into(by_path[path], cache, clients[path], prefix, query, policy, budget)
                        bar.advance()
            for path, row in by_path.items():
                if info.selective and info.layout == PRIMARY_LAYOUT:  # agreement with the exact ranking, off the clock
                    row.recall = clients[path].reprefill(prefixes[0], self._query(), policy=policy, budget=budget,
                                                         period=self.args.period, sub_period=self.args.sub_period,
                                                         evaluate_recall=True, timeout=3600).recall
                if row.page_cache_reads:
                    _progress(f"warning: {row.page_cache_reads} reads went through the page cache: "
                              "the row is marked and left out of the ratios")
                if path[0] == "shm" and not row.bytes_shm:
                    raise RuntimeError(f"{policy} {budget:g} over shm: the cache server sent no record through "
                                       "shared memory")
                rows.append(row)
        return rows

    def _ask_into(self, row: Row, cache: launch.ServiceProcess, client: ContiguousKVClient, prefix: str,
                  query: list[int], policy: str, budget: float) -> None:
        """One measured request, added to ``row`` with the cache server's counters around it."""
        before = _stats(cache.address)
        r = client.reprefill(prefix, query, policy=policy, budget=budget, period=self.args.period,
                             sub_period=self.args.sub_period, measure_floor=True, timeout=3600)
        after = _stats(cache.address)
        row.ttft_ms.append(r.timings.ttft_ms)
        row.io_wait_ms.append(r.timings.fetch_wait_ms)
        row.compute_ms.append(r.timings.compute_ms)
        row.ident_wait_ms.append(sum(t.ident_wait_ms for t in r.timings.layers))
        row.resident_ms.append(r.timings.resident_compute_ms)
        row.overhead_ms.append(r.timings.overhead_ms)
        for name in SPENT:
            row.spent_ms.setdefault(name, []).append(getattr(r.timings, f"{name}_ms"))
        row.hit_rate.append(r.prediction_hit_rate)
        row.bytes_fetched += r.bytes_fetched
        row.bytes_kv += r.bytes_kv
        row.bytes_identification += r.bytes_identification
        row.layers = [(t.wait_ms, t.compute_ms) for t in r.timings.layers]
        row.bytes_from_disk += after.bytes_read_from_disk - before.bytes_read_from_disk
        row.bytes_from_dram += after.bytes_served_from_dram - before.bytes_served_from_dram
        row.bytes_requested_from_disk += after.bytes_requested_from_disk - before.bytes_requested_from_disk
        row.page_cache_reads += after.buffered_reads - before.buffered_reads
        row.bytes_shm += after.bytes_served_shm - before.bytes_served_shm

    def run(self) -> tuple[list[Row], dict[str, float], dict[str, object]]:
        warm = self.args.warm_prefixes
        cache = self._cache(dram_bytes=0)
        rows: list[Row] = []
        # One compute server per data path, side by side on the same store. The process started
        # second ran slower here whatever it served, so with several paths every cell is measured
        # twice, the servers started in one order and then in the other, and the two merged.
        orders = [self.variants] if len(self.variants) == 1 else [self.variants, self.variants[::-1]]
        try:
            for n, order in enumerate(orders):
                if len(orders) > 1:
                    _progress(f"compute servers started in the order {', '.join(map(_variant_label, order))}")
                computes: dict[Variant, launch.ServiceProcess] = {}
                try:
                    for path, window in order:  # cold: no resident identification data
                        computes[path, window] = self._compute(cache.address, ident_cache=False, path=path,
                                                               window=window)
                    with contextlib.ExitStack() as stack:
                        # keyed by the window each server reports, not the one asked for
                        clients = dict(_served(path, stack.enter_context(ContiguousKVClient(c.address, timeout=3600)))
                                       for (path, _), c in computes.items())
                        if n == 0:
                            first = next(iter(clients.values()))
                            info = first.model_info()
                            self.vocab = info.vocab_size
                            self.policies = resolve(self.requested, info) if self.requested != LOADING else \
                                [p for p in info.policy_info if p.loads_kv]
                            self.register(first, max(1, warm))
                            gbps = self._disk()
                        rows = _merged(rows, self.measure(cache, clients, "cold", self.prefixes[:1],
                                                          self.args.repeats))
                finally:
                    for compute in computes.values():
                        compute.stop()
        finally:
            cache.stop()
        try:
            if warm:
                rows += self._warm(info)
        finally:
            shutil.rmtree(Path(self.socket).parent, ignore_errors=True)
        return rows, gbps, {"model": info.name, "num_layers": info.num_layers, "kv_heads": info.num_kv_heads,
                            "head_dim": info.head_dim, "dtype": info.dtype, "device": info.device,
                            "score_dtype": info.score_dtype, "score_heads": info.score_heads,
                            "score_window": info.score_window}

    def _warm(self, info: ModelInfo) -> list[Row]:
        """Per policy: the warm stream with the attention-guided DRAM cache (ContiguousKV's rule) and,
        for a baseline whose own rule differs (:data:`OWN_RULES`), again with its own rule. The DRAM
        budget is ``--warm-dram-fraction`` of the policy's hot set, so every policy must evict."""
        rows = []
        weights = [1.0 / (i + 1) for i in range(len(self.prefixes))]  # Zipf-like skew
        stream = self.rng.choices(self.prefixes, weights=weights, k=self.args.warm_queries)
        prefix_kv = kv_bytes(info, self.prefix_tokens)
        for policy_info, b in self.cells():
            if not policy_info.loads_kv:
                continue
            policy = policy_info.name
            dram = dram_budget(prefix_kv, len(set(stream)), b if policy_info.selective else 1.0,
                               self.args.warm_dram_fraction)
            for rule in dict.fromkeys(("attention", OWN_RULES.get(policy, "attention"))):
                cache = self._cache(dram_bytes=dram, rule=rule)
                try:
                    with contextlib.ExitStack() as stack:  # one compute server per data path, side by side
                        clients = {}
                        for path in self.paths:
                            compute = self._compute(cache.address, path=path)
                            stack.callback(compute.stop)
                            client = stack.enter_context(ContiguousKVClient(compute.address, timeout=3600))
                            for prefix in stream:  # warm-up pass: fills the DRAM cache (and this server's
                                client.reprefill(prefix, self._query(), policy=policy, budget=b,  # ident cache)
                                                 period=self.args.period, sub_period=self.args.sub_period,
                                                 timeout=3600)
                            clients[(path, None)] = client
                        clients = dict(_served(path, client) for (path, _), client in clients.items())
                        saved = self.policies, self.budgets
                        self.policies, self.budgets = [policy_info], [b]
                        measured = self.measure(cache, clients, "warm", stream, len(stream))
                        self.policies, self.budgets = saved
                finally:
                    cache.stop()
                for row in measured:
                    row.eviction_rule, row.dram_budget_bytes = rule, dram
                rows += measured
        return rows

    def _disk(self) -> dict[str, float]:
        files = sorted((self.root / "store").rglob("*.data"))
        sizes = {"64KiB": 64 << 10, "128KiB": 128 << 10, "1MiB": 1 << 20}
        _progress("measuring raw O_DIRECT disk bandwidth at 64 KiB, 128 KiB and 1 MiB ...")
        return {name: raw_read_gbps(files, size) for name, size in sizes.items()}


Variant = tuple[str, int | None]
"""What a cold row's compute server was started with: (data path, ``--score-window`` or None for its default)."""


def _served(path: str, client: ContiguousKVClient) -> tuple[Variant, ContiguousKVClient]:
    """``client`` keyed by its data path and the scoring window its server reports."""
    return (path, client.model_info().score_window), client


def _variant_label(variant: Variant) -> str:
    path, window = variant
    return path if window is None else f"{path} window {window}"


def _kv_request(layout: str, sub_period: int | None) -> str:
    if layout != PRIMARY_LAYOUT:  # the impress layout's 64-token K or V blocks
        return "64KiB"
    return "128KiB" if (sub_period or 4) >= 4 else "64KiB"


def _shown(path: Path) -> str:
    """A path as the JSON records it: relative to the current directory when under it, else its
    name (a report says what was run, not where on the machine that ran it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _speedups(results: list[dict[str, object]]) -> None:
    """Each row's TTFT speedup against every other policy at the same budget (or budgetless), on
    the same cache, length, path, scoring window and DRAM eviction rule; warm rows also get
    ``speedup_vs_own_rule``: against each other policy run with its own rule (:data:`OWN_RULES`).
    Rows of a run with several windows also get ``speedup_vs_score_window``: against the same cell
    scored with each other window."""
    for row in results:
        peers = [r for r in results
                 if r["cache"] == row["cache"] and r["prefix_tokens"] == row["prefix_tokens"] and r["path"] == row["path"]
                 and r.get("score_window") == row.get("score_window")
                 and not r["page_cache_reads"] and not row["page_cache_reads"]
                 and r["policy"] != row["policy"] and (not r["selective"] or r["budget"] == row["budget"])]
        rule = row.get("eviction_rule", "")
        row["speedup"] = {r["policy"]: r["ttft_ms_p50"] / row["ttft_ms_p50"]  # type: ignore[operator]
                          for r in peers if r.get("eviction_rule", "") == rule}
        if row["cache"] == "warm":
            row["speedup_vs_own_rule"] = {
                r["policy"]: r["ttft_ms_p50"] / row["ttft_ms_p50"]  # type: ignore[operator]
                for r in peers if r.get("eviction_rule") == OWN_RULES.get(str(r["policy"]), "attention")}
        if row["path"] != "grpc":  # the same policy, budget, cache and window over gRPC bytes, side by side
            over_grpc = [r for r in results if r["path"] == "grpc" and r.get("score_window") == row.get("score_window")
                         and r.get("eviction_rule", "") == row.get("eviction_rule", "")
                         and all(r[k] == row[k] for k in ("policy", "budget", "cache", "prefix_tokens"))]
            if over_grpc:
                row["speedup_over_grpc"] = over_grpc[0]["ttft_ms_p50"] / row["ttft_ms_p50"]  # type: ignore[operator]
        other_windows = {str(r["score_window"]): r["ttft_ms_p50"] / row["ttft_ms_p50"]  # type: ignore[operator]
                         for r in results if r.get("score_window") != row.get("score_window")
                         and not r["page_cache_reads"] and not row["page_cache_reads"]
                         and all(r[k] == row[k] for k in ("policy", "budget", "cache", "prefix_tokens", "path"))}
        if other_windows:  # the same cell scored with another window, side by side (--score-window 0,8)
            row["speedup_vs_score_window"] = other_windows


def _print(results: list[dict[str, object]], gbps: dict[str, float]) -> None:
    print("raw O_DIRECT disk: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in gbps.items()))
    several = len({r.get("score_window") for r in results}) > 1
    width = 10 if several else 5
    head = f"{'cache':<5} {'path':<{width}}{'policy':<12}{'budget':>7}{'TTFT p50':>10}{'p95':>9}{'floor':>8}{'/floor':>7}" \
           f"{'io fl':>7}{'resid':>7}{'wait':>8}{'compute':>9}{'MiB disk':>10}{'MiB dram':>9}{'amp':>6}  speedup vs"
    print(head)
    for r in results:
        sp = " ".join(f"{p}:{v:.2f}x" for p, v in r["speedup"].items())  # type: ignore[union-attr]
        cache = f"{r['cache']}" + (f"/{r['eviction_rule']}" if r.get("eviction_rule") else "")
        path = f"{r['path']}/w{r['score_window']}" if several else r["path"]
        print(f"{cache:<5} {path:<{width}}{r['policy']:<12}{r['budget']:>7.2f}{r['ttft_ms_p50']:>10.1f}{r['ttft_ms_p95']:>9.1f}"
              f"{r['floor_ms']:>8.1f}{r['ttft_over_floor'] or 0:>7.2f}{r['io_floor_ms']:>7.1f}"
              f"{r['resident_compute_ms']:>7.1f}{r['io_wait_ms']:>8.1f}{r['compute_ms']:>9.1f}"
              f"{r['bytes_from_disk'] / 2**20:>10.1f}{r['bytes_from_dram'] / 2**20:>9.1f}"
              f"{r['read_amplification']:>6.2f}  {sp}")


GPU_SUITE = [("random:qwen2.5-7b", 16384), ("random:qwen2.5-7b", 32768), ("random:qwen2.5-14b", 16384)]
"""The GPU suite's runs: (model, prefix tokens), on cuda in bfloat16 with the other options as given."""
GPU_SUITE_DRY_RUN = [("random:tiny", 512), ("random:tiny", 1024)]
"""``--gpu-suite --device cpu``: the same suite, loop and report on the smallest shapes (two runs, so
the per-run merging is exercised too)."""
DRY_RUN_SETTINGS = {"dtype": "float32", "kv_dtype": "float32", "query_tokens": 8, "budgets": "0.1,0.5", "repeats": 1,
                    "warm_prefixes": 0}
"""What a dry run overrides besides the shapes: whatever keeps each cell one quick request."""


def _suite(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.gpu_suite and args.device == "cpu":  # the dry run: same code path, smallest shapes
        for name, value in DRY_RUN_SETTINGS.items():
            setattr(args, name, value)
        return list(GPU_SUITE_DRY_RUN)
    if args.gpu_suite:
        args.device, args.dtype, args.kv_dtype = "cuda", "bfloat16", "bfloat16"
        return list(GPU_SUITE)
    return [(args.model, tokens) for tokens in _lengths(args.prefix_tokens)]


def _lengths(text: str | int) -> list[int]:
    """``--prefix-tokens``: one length or a comma-separated list, each at least 1."""
    try:
        lengths = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--prefix-tokens: {text!r} is not a list of token counts") from None
    if not lengths or min(lengths) < 1:
        raise SystemExit(f"--prefix-tokens: {text!r}: give at least one positive count")
    return lengths


QUICK = {"budgets": "0.05", "repeats": 2, "warm_prefixes": 0, "policies": LOADING}
"""Defaults without ``--full``: the target cell (5 %), cold, every policy that loads KV."""
FULL = {"budgets": "0.05,0.1,0.25,0.5", "repeats": 3, "warm_prefixes": 3, "policies": "all"}
"""``--full``: the whole sweep."""


def apply_defaults(args: argparse.Namespace) -> None:
    """Fill every option left unset from :data:`QUICK`, or from :data:`FULL` with ``--full`` or
    ``--gpu-suite`` (the GPU run is the whole sweep)."""
    whole = getattr(args, "full", False) or getattr(args, "gpu_suite", False)
    for name, value in (FULL if whole else QUICK).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def source_commit() -> str | None:
    """The git commit of the code this bench runs, with ``+dirty`` when it has uncommitted changes;
    ``None`` outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run(args: argparse.Namespace) -> int:
    """Run the bench; prints a table, writes --json and --plot outputs; returns 0."""
    apply_defaults(args)
    all_results: list[dict[str, object]] = []
    rows_by_run = []
    machine: dict[str, object] = {"platform": platform.platform(), "python": platform.python_version(),
                                  "commit": source_commit()}
    gbps: dict[str, float] = {}
    began = time.monotonic()
    registration_s = 0.0
    for model, tokens in _suite(args):
        base = args.workdir or Path.cwd()
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ckv-bench-", dir=base) as tmp:
            bench = Bench(args, model, tokens, Path(tmp))
            rows, gbps, info = bench.run()
            registration_s += bench.registration_s
        machine.update(info)
        results = [r.summary(gbps, _kv_request(r.layout, args.sub_period)) for r in rows]
        _speedups(results)
        all_results += results
        rows_by_run += rows
        _print(results, gbps)
    report = {"machine": machine, "config": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                             if k not in ("func",)},
              "raw_disk_gbps": gbps.get("128KiB"), "raw_disk_gbps_by_size": gbps,
              "wall_s": time.monotonic() - began, "registration_s": registration_s, "results": all_results}
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_reprefill(rows_by_run, all_results, args.plot)
    return 0
