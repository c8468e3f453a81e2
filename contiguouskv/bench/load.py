"""``contiguouskv bench load``: many concurrent clients doing Re-Prefill, per concurrency level.

Registers ``--prefixes`` random-token prefixes, then for each level of ``--concurrency`` runs that
many worker tasks for ``--seconds``; each worker owns one async SDK client (its own channel, so its
own connection) and sends Re-Prefill requests back to back over the prefixes, each with a
``--timeout``. A failed call is counted by its SDK status (``DEADLINE_EXCEEDED``, ...) or, for
anything else, its exception class, and the worker goes on after 50 ms; no call is retried (the
SDK's retry on UNAVAILABLE is off, so every failure shows). TTFT is the client's wall time of one call
(``max_new_tokens=0``: the call ends with the first token), queueing included.

``--soak MINUTES`` runs one level (``--soak-concurrency``, default 32) that long instead and samples
every ``--sample-every`` seconds the RSS and open file descriptors of the server processes
(``/proc/PID/status``, ``/proc/PID/fd``): the ones it started, or ``--pid`` ones with ``--compute``.
``rss_growth_pct`` is the growth from the first sample at or after 10 % of the soak (warm-up) to
the last one, per process.

By default it starts a cache server and a compute server (``--threads 1`` on machines with <= 4
cores) in a temp dir under the current one; ``--compute HOST:PORT`` targets running servers.
``--max-batch 1,16`` runs every level once per value, each against a compute server started with
that ``--max-batch`` (1: no batched layer passes) over the same cache server and prefixes, so the
rows compare batching side by side. ``--policy``/``--budget`` take comma lists: each worker cycles
through every (policy, budget) pair, a mixed load. Each row carries the compute server's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contiguouskv import launch
from contiguouskv.bench.policies import extra_layouts, resolve
from contiguouskv.client import NO_RETRY, AsyncContiguousKVClient, ContiguousKVError
from contiguouskv.connection import add_connection_arguments, tls_from_args, token_from_args

CONNECT_TIMEOUT_S = 60.0
ERROR_PAUSE_S = 0.05  # a worker's pause after a failed call
Json = dict[str, Any]  # an object of the JSON report
CONFIG_KEYS = ("concurrency", "seconds", "prefixes", "model", "prefix_tokens", "query_tokens", "policy", "budget",
               "timeout", "soak", "soak_concurrency", "sample_every", "compute", "pid", "compute_threads", "seed",
               "max_batch", "max_active_requests")


def _levels(raw: str) -> list[int]:
    try:
        levels = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {raw!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be >= 1, got {raw!r}")
    return levels


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {raw!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bench load`` (every one has a default)."""
    a = parser.add_argument
    a("--concurrency", type=_levels, default=[8, 32, 64], help="concurrent clients per level (default 8,32,64)")
    a("--seconds", type=float, default=20.0, help="seconds per level (default 20)")
    a("--prefixes", type=_positive, default=8, help="prefixes registered and queried round robin (default 8)")
    a("--model", default="random:tiny", help="model of the started compute server (default random:tiny)")
    a("--prefix-tokens", type=int, default=1024, help="tokens per prefix (default 1024)")
    a("--query-tokens", type=int, default=32, help="tokens per query (default 32)")
    a("--policy", default="contiguous",
      help="Re-Prefill policy, or a comma list cycled through by every worker (default contiguous)")
    a("--budget", default="0.25", help="fraction of the prefix to load, or a comma list (default 0.25)")
    a("--max-batch", type=_levels, default=[1, 16],
      help="the started compute server's --max-batch, one run of every level per value (default 1,16; "
      "a --soak uses the last)")
    a("--max-active-requests", type=_positive, default=64,
      help="the started compute server's --max-active-requests (default 64)")
    a("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    a("--soak", type=float, metavar="MINUTES", help="run one level this long and sample server RSS and fds")
    a("--soak-concurrency", type=_positive, default=32, help="clients of the soak level (default 32)")
    a("--sample-every", type=float, default=5.0, help="seconds between RSS/fd samples of a soak (default 5)")
    a("--compute", help="target this running compute server HOST:PORT instead of starting servers")
    a("--pid", type=int, action="append", default=[],
      help="with --compute: a server process to sample during a soak (repeatable)")
    add_connection_arguments(parser, "--compute", "read,write")
    a("--compute-threads", type=int,
      help="torch threads of the started compute server (default 1 on machines with <= 4 cores, else torch's)")
    a("--workdir", type=Path, help="store directory (default: a temp dir under the current one)")
    a("--seed", type=int, default=0, help="random seed of prefixes and queries (default 0)")
    a("--json", dest="json_path", type=Path, help="write results as JSON here")


@dataclass
class Tally:
    """What one level's workers saw: call latencies and errors by status or exception class."""

    ttft_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)

    def fail(self, err: BaseException) -> None:
        key = err.status if isinstance(err, ContiguousKVError) else type(err).__name__
        self.errors[key] = self.errors.get(key, 0) + 1
        self.error_examples.setdefault(key, str(err)[:300])


@dataclass
class ProcessSamples:
    """RSS (bytes) and open fds of one server process over a soak, with the time of each sample."""

    name: str
    pid: int
    t_s: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def sample(self, t_s: float) -> None:
        with contextlib.suppress(OSError):  # gone: no sample
            status = Path(f"/proc/{self.pid}/status").read_text()
            rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            self.t_s.append(t_s)
            self.rss_bytes.append(rss_kb * 1024)
            self.fds.append(fds)

    def summary(self, warmup_s: float, end_s: float = math.inf) -> Json:
        """Growth from the first sample at or after ``warmup_s`` to the last one at or before ``end_s``
        (the end of the load: a sample taken after the clients stopped would hide growth)."""
        warm = next((i for i, t in enumerate(self.t_s) if t >= warmup_s), None)
        last = max((i for i, t in enumerate(self.t_s) if t <= end_s), default=None)
        if warm is None or last is None or last < warm:
            return {"name": self.name, "pid": self.pid, "samples": len(self.t_s), "rss_growth_pct": None}
        base, end = self.rss_bytes[warm], self.rss_bytes[last]
        return {"name": self.name, "pid": self.pid, "samples": len(self.t_s), "warmup_s": warmup_s,
                "rss_mb_warm": base / 2**20, "rss_mb_end": end / 2**20, "rss_mb_max": max(self.rss_bytes) / 2**20,
                "rss_growth_pct": (end - base) / base * 100, "fds_warm": self.fds[warm], "fds_end": self.fds[last],
                "fds_max": max(self.fds), "t_s": self.t_s, "rss_bytes": self.rss_bytes, "fd_counts": self.fds}


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when empty)."""
    if not ordered:
        return None
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


def _progress(message: str) -> None:
    print(f"[bench load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class LoadGenerator:
    """Registers the prefixes once, then runs levels against one compute server address."""

    def __init__(self, args: argparse.Namespace, address: str, max_batch: int | None = None,
                 metrics_url: str | None = None) -> None:
        self.args = args
        self.address = address
        self.max_batch = max_batch  # of the compute server under test; None: not known (--compute)
        self.metrics_url = metrics_url  # its Prometheus endpoint, when the bench started it with one
        self.rng = random.Random(args.seed)
        self.prefixes: list[str] = []
        self.vocab = 0
        self.token = token_from_args(args)

    def _client(self) -> AsyncContiguousKVClient:
        return AsyncContiguousKVClient(self.address, timeout=self.args.timeout, retry=NO_RETRY,
                                       token=self.token, tls=tls_from_args(self.args))

    def _tokens(self, rng: random.Random, count: int) -> list[int]:
        return [rng.randrange(self.vocab) for _ in range(count)]

    async def register(self) -> None:
        async with self._client() as client:
            info = await client.model_info(timeout=CONNECT_TIMEOUT_S)
            self.vocab = info.vocab_size
            extra = extra_layouts(resolve(self.args.policy, info))  # what every policy of the mix reads
            for i in range(self.args.prefixes):
                _progress(f"registering prefix {i + 1}/{self.args.prefixes} ({self.args.prefix_tokens} tokens)")
                reg = await client.register(token_ids=self._tokens(self.rng, self.args.prefix_tokens),
                                            extra_layouts=extra, timeout=600)
                self.prefixes.append(reg.prefix_id)

    async def _worker(self, index: int, client: AsyncContiguousKVClient, end: float, tally: Tally) -> float:
        """Requests back to back until ``end``; returns when its last call finished."""
        rng = random.Random(self.args.seed * 1_000_003 + index)
        budgets = [None] if self.args.budget is None else [float(b) for b in str(self.args.budget).split(",")]
        mix = [(p, b) for p in self.args.policy.split(",") for b in budgets]
        n = index
        while time.monotonic() < end:
            prefix = self.prefixes[n % len(self.prefixes)]
            policy, budget = mix[n % len(mix)]
            n += 1
            query = self._tokens(rng, self.args.query_tokens)
            start = time.monotonic()
            try:  # the SDK's deadline ends the call; wait_for is a backstop should it not
                await asyncio.wait_for(client.reprefill(prefix, query, policy=policy,
                                                        budget=budget, timeout=self.args.timeout),
                                       self.args.timeout * 1.1 + 1)
            except Exception as err:  # counted, not raised: a load test goes on through errors
                tally.fail(err)
                await asyncio.sleep(ERROR_PAUSE_S)  # a fast refusal must not become a busy loop
            else:
                tally.ttft_ms.append((time.monotonic() - start) * 1e3)
        return time.monotonic()

    async def level(self, concurrency: int, seconds: float,
                    watched: list[ProcessSamples]) -> Json:
        """One level: ``concurrency`` workers for ``seconds``; samples ``watched`` while it runs."""
        clients = [self._client() for _ in range(concurrency)]
        tally = Tally()
        try:  # connect every channel before the clock starts; a failed connect counts as an error
            for outcome in await asyncio.gather(*(c.model_info(timeout=CONNECT_TIMEOUT_S) for c in clients),
                                                return_exceptions=True):
                if isinstance(outcome, Exception):
                    tally.fail(outcome)
            before = await self._compute_thread()
            start = time.monotonic()
            sampler = asyncio.create_task(self._sample(watched, start))
            try:
                finished = await asyncio.gather(*(self._worker(i, c, start + seconds, tally)
                                                  for i, c in enumerate(clients)))
            finally:
                sampler.cancel()
            for proc in watched:  # one last sample at the end
                proc.sample(time.monotonic() - start)
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        elapsed = max(finished) - start
        thread = _thread_use(before, await self._compute_thread(), elapsed)
        ordered = sorted(tally.ttft_ms)
        return {"concurrency": concurrency, "max_batch": self.max_batch, "policy": self.args.policy,
                "budget": self.args.budget, "seconds": elapsed,
                "peak_rss_mb": {p.name: max(p.rss_bytes) / 2**20 for p in watched if p.rss_bytes} or None, "requests": len(ordered),
                "rps": len(ordered) / elapsed, "ttft_ms_p50": _percentile(ordered, 0.50),
                "ttft_ms_p95": _percentile(ordered, 0.95), "ttft_ms_p99": _percentile(ordered, 0.99),
                "ttft_ms_max": ordered[-1] if ordered else None,
                "errors_total": sum(tally.errors.values()), "errors": tally.errors,
                "error_examples": tally.error_examples, "rss_growth_pct": None, **thread}

    async def _compute_thread(self) -> dict[str, float] | None:
        """The compute thread's counters from the compute server's metrics, if the bench has them."""
        if self.metrics_url is None:
            return None
        return await asyncio.to_thread(compute_thread_counters, self.metrics_url)

    async def _sample(self, watched: list[ProcessSamples], start: float) -> None:
        while watched:
            for proc in watched:
                proc.sample(time.monotonic() - start)
            await asyncio.sleep(self.args.sample_every)

    async def run(self, watched: list[ProcessSamples]) -> list[Json]:
        await self.register()
        if self.args.soak is not None:
            seconds = self.args.soak * 60
            _progress(f"soak: {self.args.soak_concurrency} clients for {seconds:.0f}s, sampling {len(watched)} "
                      f"process(es) every {self.args.sample_every:g}s")
            result = await self.level(self.args.soak_concurrency, seconds, watched)
            processes = [p.summary(0.1 * seconds, seconds) for p in watched]
            result["processes"] = processes
            result["rss_growth_pct"] = {p["name"]: p["rss_growth_pct"] for p in processes} or None
            return [result]
        results = []
        for concurrency in self.args.concurrency:
            batch = "" if self.max_batch is None else f" (max_batch {self.max_batch})"  # unknown with --compute
            _progress(f"{concurrency} clients for {self.args.seconds:g}s{batch}")
            watched_now = [ProcessSamples(p.name, p.pid) for p in watched]  # fresh samples per level
            results.append(await self.level(concurrency, self.args.seconds, watched_now))
        return results


THREAD_COUNTERS = {("ckv_compute_thread_busy_seconds_total", ""): "busy_s", ("ckv_compute_thread_ops_total", ""): "ops",
                   ("ckv_compute_thread_passes_total", "true"): "batched",
                   ("ckv_compute_thread_passes_total", "false"): "alone"}


def compute_thread_counters(url: str) -> dict[str, float]:
    """The compute thread's cumulative counters (``busy_s``, ``ops``, ``batched``, ``alone``) from a
    compute server's Prometheus endpoint (only called when the bench started it with metrics, so
    prometheus-client is installed)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = THREAD_COUNTERS.get((sample.name, sample.labels.get("batched", "")))
            if key is not None:
                out[key] = float(sample.value)
    return out


def _thread_use(before: dict[str, float] | None, after: dict[str, float] | None, seconds: float) -> Json:
    """Row fields from the compute thread's counters over a level: the fraction of the level's time
    it ran model ops (``compute_busy_fraction``, near 1: the model's own work limits throughput) and
    requests per pass (``ops_per_pass``, 1: no pass was shared)."""
    if before is None or after is None or seconds <= 0:
        return {"compute_busy_fraction": None, "ops_per_pass": None}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in THREAD_COUNTERS.values()}
    passes = d["batched"] + d["alone"]
    return {"compute_busy_fraction": d["busy_s"] / seconds, "ops_per_pass": d["ops"] / passes if passes else None}


def _metrics_url(compute: launch.ServiceProcess) -> str | None:
    found = re.search(r"metrics on (http://[^\s]+/metrics)", compute.log_tail(400))
    return found.group(1) if found else None


def _start_cache(root: Path, stack: contextlib.ExitStack) -> launch.ServiceProcess:
    cache = launch.cache_server(root / "store", log_path=root / "cache.log")
    stack.callback(cache.stop)
    cache.wait_ready(timeout=120)
    return cache


def _start_compute(args: argparse.Namespace, root: Path, cache: launch.ServiceProcess, max_batch: int,
                   stack: contextlib.ExitStack) -> launch.ServiceProcess:
    threads = args.compute_threads
    if threads is None:
        threads = 1 if (os.cpu_count() or 1) <= 4 else 0
    # All workers come from this host, so they are one client for the per-client limit (default 64):
    # raise it to the largest level, which is then what the run measures.
    clients = max([*args.concurrency, args.soak_concurrency])
    compute = launch.compute_server(args.model, cache.address, "--threads", str(threads),
                                    "--max-streams-per-client", str(max(64, clients)),
                                    "--max-batch", str(max_batch),
                                    "--max-active-requests", str(args.max_active_requests),
                                    *(("--metrics-port", "0") if importlib.util.find_spec("prometheus_client") else ()),
                                    log_path=root / f"compute-b{max_batch}.log")
    stack.callback(compute.stop)
    _progress(f"starting compute server ({args.model}, max_batch {max_batch}) ...")
    compute.wait_ready(timeout=900)
    return compute


def _print(results: list[Json]) -> None:
    print(f"{'batch':>5}{'clients':>8}{'requests':>10}{'rps':>9}{'TTFT p50':>10}{'p95':>9}{'p99':>9}"
          f"{'peak RSS':>10}{'busy':>6}{'ops/pass':>9}  errors")
    for r in results:
        ms = [f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in
              (r["ttft_ms_p50"], r["ttft_ms_p95"], r["ttft_ms_p99"])]
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        rss = (r.get("peak_rss_mb") or {}).get("compute")
        print(f"{r['max_batch'] if r['max_batch'] is not None else '-':>5}{r['concurrency']:>8}{r['requests']:>10}"
              f"{r['rps']:>9.1f} {ms[0]}{ms[1]}{ms[2]}{'-' if rss is None else round(rss):>10}"
              f"{_fmt(r.get('compute_busy_fraction'), '.0%'):>6}{_fmt(r.get('ops_per_pass'), '.1f'):>9}  {errors}")
        for p in r.get("processes", []):
            if p["rss_growth_pct"] is not None:
                print(f"  {p['name']} (pid {p['pid']}): RSS {p['rss_mb_warm']:.1f} -> {p['rss_mb_end']:.1f} MiB "
                      f"({p['rss_growth_pct']:+.2f} %), fds {p['fds_warm']} -> {p['fds_end']}, "
                      f"{p['samples']} samples")
    _print_ratios(results)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_ratios(results: list[Json]) -> None:
    """Requests per second of each batched run over the unbatched one at the same concurrency."""
    alone = {r["concurrency"]: r["rps"] for r in results if r["max_batch"] == 1}
    for r in results:
        if r["max_batch"] not in (None, 1) and alone.get(r["concurrency"]):
            print(f"max_batch {r['max_batch']} / 1 at {r['concurrency']} clients: "
                  f"{r['rps'] / alone[r['concurrency']]:.2f}x requests per second")


def batch_ratios(results: list[Json]) -> dict[str, float]:
    """``{"<max_batch>@<clients>": rps over the max_batch 1 row's}`` for the JSON report."""
    alone = {r["concurrency"]: r["rps"] for r in results if r["max_batch"] == 1}
    return {f"{r['max_batch']}@{r['concurrency']}": r["rps"] / alone[r["concurrency"]] for r in results
            if r["max_batch"] not in (None, 1) and alone.get(r["concurrency"])}


def run(args: argparse.Namespace) -> int:
    """Run the load test; prints a table, writes ``--json``; returns 0 (1 if any call failed)."""
    results: list[Json] = []
    with contextlib.ExitStack() as stack:
        if args.compute:
            watched = [ProcessSamples(f"pid{pid}", pid) for pid in args.pid]
            results = asyncio.run(LoadGenerator(args, args.compute).run(watched))
        else:
            base = args.workdir or Path.cwd()
            base.mkdir(parents=True, exist_ok=True)
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ckv-bench-", dir=base)))
            cache = _start_cache(root, stack)
            for max_batch in (args.max_batch if args.soak is None else args.max_batch[-1:]):  # a soak: one run
                with contextlib.ExitStack() as per_run:
                    compute = _start_compute(args, root, cache, max_batch, per_run)
                    watched = [ProcessSamples("cache", cache.proc.pid), ProcessSamples("compute", compute.proc.pid)]
                    results += asyncio.run(LoadGenerator(args, compute.address, max_batch,
                                                         _metrics_url(compute)).run(watched))
    _print(results)
    if args.json_path:
        config = {k: getattr(args, k) for k in CONFIG_KEYS}
        machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
        args.json_path.write_text(json.dumps({"machine": machine, "config": config, "results": results,
                                              "rps_over_unbatched": batch_ratios(results)}, indent=2))
    return 1 if any(r["errors_total"] for r in results) else 0
