"""The compute server's request logic, without gRPC: register prefixes and run Re-Prefill.

Runs on the server's event loop. A request is admitted (:mod:`.admission`) before it opens a Fetch
stream; its layer loop then runs on a request thread, and every model op on the one compute thread,
batched with other requests' (:mod:`.scheduler`), while fetch traffic keeps flowing on the loop.
A request cancelled at any point (deadline, client gone, shutdown) closes its stream, wakes its
waits and stops at its next layer; its admission is released only once its thread has let go.
Which prefix KV a request reads is its loading policy's business (:mod:`.policies`); how it is
stored, its layout's (:mod:`.layouts`). This module names neither a policy nor a layout.
"""

from __future__ import annotations

import logging
import asyncio
import contextlib
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from contiguouskv.common.malloc import return_free_memory
from contiguouskv.compute_server.admission import Admission, AdmissionSnapshot
from contiguouskv.compute_server.cachenet.attention import RegionScores
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.config import ComputeServerConfig
from contiguouskv.compute_server.engine import Cancellation, Engine, QueryJob
from contiguouskv.compute_server.errors import BadRequest, ComputeError, NotRegistered, NotServable, Unavailable
from contiguouskv.compute_server.kvio.identcache import IdentCache
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.layouts.base import KVGeometry, LayoutCodec
from contiguouskv.compute_server.engine import QueryOutcome
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.compute_server.layouts.registry import PRIMARY_LAYOUT, build_codec, layout_kinds, parse_codec
from contiguouskv.compute_server.layouts.tensors import TORCH_DTYPES, dtype_name
from contiguouskv.compute_server.lookahead import LookAhead
from contiguouskv.compute_server.model.loading import LoadedModel
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.observability.tracing import traced_reprefill
from contiguouskv.compute_server.policies.base import LoadingPolicy, PolicyContext, PolicyParams
from contiguouskv.compute_server.policies.registry import PolicyRegistry
from contiguouskv.compute_server.request import RegisterReport, ReprefillArgs, ReprefillReport
from contiguouskv.compute_server.scheduler import LayerScheduler, ScheduledProjector
from contiguouskv.compute_server.selection.chunks import score_dtype

log = logging.getLogger(__name__)

PREFIX_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


def prefix_id_for(fingerprint: str, token_ids: list[int]) -> str:
    """Content hash of (model fingerprint, tokens): the prefix's id on every cache shard."""
    h = hashlib.sha256(fingerprint.encode() + b"\0")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.hexdigest()[:32]


def _stored_codec(kind: str, metadata: bytes, prefix_id: str, name: str) -> tuple[LayoutCodec, dict[str, object]]:
    """The codec of a stored object; FAILED_PRECONDITION when its metadata cannot be read (an object
    stored under a compute layout's name by some other writer), instead of a failure inside."""
    try:
        return parse_codec(kind, metadata)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NotServable(f"prefix_id {prefix_id}: the stored {name} object has unreadable metadata "
                                 f"({type(exc).__name__}: {str(exc)[:120]}); delete it and register the prefix again")


class ComputeCore:
    """Registers prefixes and answers queries for one loaded model."""

    def __init__(self, config: ComputeServerConfig, model: LoadedModel, runner: ModelRunner, cache: CacheClient,
                 policies: PolicyRegistry | None = None) -> None:
        self.config = config
        self.model = model
        self.runner = runner
        self.cache = cache
        self.policies = policies if policies is not None else PolicyRegistry.with_plugins(config.policy_plugins)
        self.scheduler = LayerScheduler(runner, config.max_batch)
        self.projector = ScheduledProjector(self.scheduler)
        self.engine = Engine(self.scheduler, prefill_block=config.prefill_block,
                             importance_window=config.importance_window,
                             kv_dtype=TORCH_DTYPES[config.kv_dtype] if config.kv_dtype else None)
        self.ident_cache = IdentCache(config.ident_cache_bytes) if config.ident_cache_bytes else None
        self.score_dtype = score_dtype(config.score_dtype, runner.device)
        """What the chunk scorers' q.k matmuls run in (config ``score_dtype``, resolved for the device)."""
        self.admission = Admission(config.max_active_requests, config.max_queued_requests, config.max_staged_bytes,
                                   on_idle=self._idle)
        # admitted requests each get a thread (their waits block only them); +1 for a registration
        self._requests = ThreadPoolExecutor(max_workers=config.max_active_requests + 1, thread_name_prefix="request")
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        # policies' look-ahead (contiguous+ scoring layer l + 1 while layer l runs) on its own
        # thread(s), so that it uses a core the request's thread does not; a request that catches up
        # with a look-ahead not yet begun runs it itself (IdentifiedPolicy._join)
        self.look_ahead = LookAhead(config.look_ahead_threads)
        self._running: set[Cancellation] = set()
        self.kv_dtype = config.kv_dtype or dtype_name(runner.dtype)
        self.geometry = KVGeometry(model.num_layers, model.num_attention_heads, model.num_kv_heads, model.head_dim,
                                   self.kv_dtype, config.chunk_size, config.group_size)
        self.layout_name = build_codec(PRIMARY_LAYOUT, 1, self.geometry).name
        """The name of the primary (`contiguous`) layout this server stores and reads."""
        self._reports: set[asyncio.Task[None]] = set()
        self._registering: dict[str, asyncio.Event] = {}  # prefix id -> set when its storing call ends

    # --- tokens ----------------------------------------------------------------------------------
    def tokens(self, value: str | list[int], field_name: str) -> list[int]:
        """Token ids of text or of given ids, validated against the vocabulary."""
        m = self.model
        if isinstance(value, str):
            if m.tokenizer is None:
                raise BadRequest(f"{field_name}: model {m.name} has no tokenizer; send token ids")
            ids = list(m.tokenizer.encode(value, add_special_tokens=False))
        else:
            ids = list(value)
        if not ids:
            raise BadRequest(f"{field_name}: empty")
        bad = [t for t in ids if not 0 <= t < m.vocab_size]
        if bad:
            raise BadRequest(f"{field_name}: token id {bad[0]} outside the vocabulary [0, {m.vocab_size})")
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` as one sequence, special tokens (end of turn, padding) skipped; "" without a
        tokenizer."""
        tok = self.model.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""

    async def _on_request_thread(self, cancellation: Cancellation, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` on a request thread. Cancelled, the caller still waits for the thread to let go
        (``cancellation`` stops it at its next layer), so admission is never released early."""
        future = asyncio.get_running_loop().run_in_executor(self._requests, fn, *args)
        self._running.add(cancellation)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancellation.cancel()
            await asyncio.wait({future})
            if not future.cancelled():  # its error (the cancellation's) goes with ours; else asyncio logs
                future.exception()  # it as "never retrieved" (shield dropped its own callback)
            raise
        finally:
            self._running.discard(cancellation)

    def begin_shutdown(self, grace_s: float) -> None:
        """Draining: refuse new and queued requests (UNAVAILABLE) now; stop the running ones with
        UNAVAILABLE at half of ``grace_s`` unless they finish before (the other half is for them to
        reach their next layer and answer, well inside the grace gRPC gives them)."""
        self.admission.drain("the compute server is shutting down")

        def stop_running() -> None:
            for cancellation in list(self._running):
                cancellation.cancel(Unavailable("the compute server is shutting down"))

        asyncio.get_running_loop().call_later(0.5 * grace_s, stop_running)

    IDLE_TRIM_S = 0.5
    """Idle this long (no request running or queued), the server gives back the memory malloc kept."""

    def _idle(self) -> None:
        """The last admitted request ended (event loop): if the server is still idle
        :attr:`IDLE_TRIM_S` later, give the memory malloc kept for requests back to the kernel
        (common/malloc.py), on a request thread, so an idle server's RSS does not carry the last
        burst's. Back-to-back requests keep their memory warm."""
        def trim_if_idle() -> None:
            if self.admission.snapshot() == AdmissionSnapshot(0, 0, 0):
                with contextlib.suppress(RuntimeError):  # the request threads are gone: shutting down
                    self._requests.submit(return_free_memory)

        asyncio.get_running_loop().call_later(self.IDLE_TRIM_S, trim_if_idle)

    # --- register --------------------------------------------------------------------------------
    async def register(self, prefix: str | list[int], extra_layouts: Sequence[str] = ()) -> RegisterReport:
        """Prefill once and store the primary layout plus any ``extra_layouts`` not stored yet."""
        unknown = sorted(set(extra_layouts) - set(layout_kinds()))
        if unknown:
            raise BadRequest(f"extra_layouts: unknown layout {unknown[0][:40]!r}; "
                             f"choose from {', '.join(self.extra_layouts())}")
        ids = self.tokens(prefix, "prefix")
        limit = min(self.config.max_prefix_tokens, self.model.max_position_embeddings - 1)
        if len(ids) > limit:
            which = "max_prefix_tokens" if limit == self.config.max_prefix_tokens else "the model's positions - 1"
            raise BadRequest(f"prefix: {len(ids)} tokens, more than the limit of {limit} ({which})")
        m = self.model
        codecs = [build_codec(kind, len(ids), self.geometry)
                  for kind in dict.fromkeys([PRIMARY_LAYOUT, *extra_layouts])]
        primary = codecs[0]
        prefix_id = prefix_id_for(m.fingerprint, ids)
        while (running := self._registering.get(prefix_id)) is not None:
            await running.wait()  # the same prefix is being stored by another call: one prefill, not two
        done = self._registering[prefix_id] = asyncio.Event()  # claimed before the first await below
        try:
            missing = [c for c in codecs
                       if await self.cache.get_manifest(prefix_id, c.name, everywhere=True) is None]
            num_chunks, chunk_size = self._chunking(primary)
            if not missing:
                return RegisterReport(prefix_id, len(ids), num_chunks, chunk_size, True, 0, 0.0, 0.0)
            async with self.admission.slot(sum(c.total_kv_bytes() for c in codecs)):
                return await self._store(prefix_id, ids, primary, missing)
        finally:
            del self._registering[prefix_id]
            done.set()  # those waiting look again: stored, or (this call failed) theirs to store

    async def _store(self, prefix_id: str, ids: list[int], primary: LayoutCodec,
                     missing: list[LayoutCodec]) -> RegisterReport:
        """Prefill ``ids`` once and store every layout in ``missing``."""
        m, cancellation = self.model, Cancellation()
        num_chunks, chunk_size = self._chunking(primary)
        t0 = time.perf_counter()
        prefilled = await self._on_request_thread(cancellation, self.engine.prefill_prefix, ids)
        prefill_s = time.perf_counter() - t0
        batch = self.config.fetch_batch_bytes
        already, written, pack_s, store_s = True, 0, 0.0, 0.0
        for codec in missing:  # one layout's payloads in memory at a time
            t1 = time.perf_counter()
            payloads = await self._on_request_thread(cancellation, lambda c=codec: list(c.pack(prefilled, batch)))
            t2 = time.perf_counter()
            metadata = codec.to_metadata(model_fingerprint=m.fingerprint, model_name=m.name)
            reply = await self.cache.put_prefix(prefix_id, codec.name, codec.regions(), metadata, payloads)
            del payloads
            pack_s, store_s = pack_s + t2 - t1, store_s + time.perf_counter() - t2
            already, written = already and reply.already_committed, written + reply.bytes_written
        return RegisterReport(prefix_id, len(ids), num_chunks, chunk_size, already, written, prefill_s + pack_s, store_s)

    @staticmethod
    def _chunking(codec: LayoutCodec) -> tuple[int, int]:
        """(chunks, tokens per chunk) of the primary layout."""
        assert isinstance(codec, ContiguousCodec)
        return codec.geometry.num_chunks, codec.geometry.chunk_size

    # --- reprefill -------------------------------------------------------------------------------
    def default_period(self, policy: type[LoadingPolicy]) -> int:
        """Layers per period of ``policy`` when a request does not say: its own, else the server's."""
        return policy.default_period if policy.default_period is not None else self.config.default_period

    @staticmethod
    def extra_layouts() -> list[str]:
        """Layouts a registration may store besides the primary one."""
        return [kind for kind in layout_kinds() if kind != PRIMARY_LAYOUT]

    def _params(self, args: ReprefillArgs) -> tuple[type[LoadingPolicy], PolicyParams]:
        if not PREFIX_ID.match(args.prefix_id):
            raise BadRequest(f"prefix_id: {args.prefix_id[:80]!r} is not 32 lowercase hex digits")
        name = args.policy or self.policies.default
        if name not in self.policies:
            raise BadRequest(f"policy: unknown {name[:40]!r}; choose one of {', '.join(self.policies.names)}")
        cls = self.policies.get(name)
        budget = 1.0 if args.budget is None else args.budget
        if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise BadRequest(f"budget: {budget} is outside (0, 1]")
        if not 0 <= args.max_new_tokens <= self.config.max_new_tokens:
            raise BadRequest(f"max_new_tokens: {args.max_new_tokens} is outside [0, {self.config.max_new_tokens}]")
        period = self.default_period(cls) if args.period is None else args.period
        sub = min(period, self.config.default_sub_period) if args.sub_period is None else args.sub_period
        if period < 1 or sub < 1 or sub > period:
            raise BadRequest(f"period/sub_period: need 1 <= sub_period <= period, got {sub} and {period}")
        return cls, PolicyParams(budget if cls.selective else 1.0, period, sub, args.evaluate_recall)

    async def _stored_primary(self, prefix_id: str) -> ContiguousCodec:
        manifest = await self.cache.get_manifest(prefix_id, self.layout_name)
        if manifest is None:
            raise NotRegistered(f"prefix_id: {prefix_id} is not registered (layout {self.layout_name})")
        codec, extra = _stored_codec(PRIMARY_LAYOUT, manifest.metadata, prefix_id, self.layout_name)
        if extra.get("model_fingerprint") != self.model.fingerprint:
            raise NotServable(
                f"prefix_id: {prefix_id} was stored for model {extra.get('model_name')!r} "
                f"(fingerprint {str(extra.get('model_fingerprint'))[:12]}), this server runs "
                f"{self.model.name!r} (fingerprint {self.model.fingerprint[:12]})")
        assert isinstance(codec, ContiguousCodec)
        return codec

    async def _stored_layout(self, prefix_id: str, primary: ContiguousCodec, policy: type[LoadingPolicy]) -> LayoutCodec:
        """The stored layout ``policy`` reads; FAILED_PRECONDITION when the prefix was registered without it."""
        if policy.layout == PRIMARY_LAYOUT:
            return primary
        want = build_codec(policy.layout, primary.num_tokens, self.geometry)
        manifest = await self.cache.get_manifest(prefix_id, want.name)
        if manifest is None:
            raise NotServable(
                f"policy {policy.name}: prefix_id {prefix_id} was registered without the {policy.layout} layout; "
                f"register it with `contiguouskv register --layouts {policy.layout}` "
                f"(SDK: register(..., extra_layouts=[{policy.layout!r}]))")
        stored, _ = _stored_codec(policy.layout, manifest.metadata, prefix_id, want.name)
        if stored != want:
            raise NotServable(f"policy {policy.name}: prefix_id {prefix_id} has layout {stored}, "
                                     f"this server expects {want}")
        return want

    @traced_reprefill
    async def reprefill(self, args: ReprefillArgs, on_token: Callable[[int, int], None] | None = None) -> ReprefillReport:
        """Load prefix KV by the request's policy, compute the query, return the first token."""
        start = time.perf_counter()
        cls, params = self._params(args)
        query = self.tokens(args.query, "query")
        if len(query) > self.config.max_query_tokens:
            raise BadRequest(f"query: {len(query)} tokens, more than the limit of {self.config.max_query_tokens} "
                         f"(max_query_tokens)")
        primary = await self._stored_primary(args.prefix_id)
        chunks = primary.geometry
        total = chunks.num_tokens + len(query) + args.max_new_tokens
        if total > self.model.max_position_embeddings:
            raise BadRequest(f"query: prefix ({chunks.num_tokens}) + query ({len(query)}) + max_new_tokens "
                         f"({args.max_new_tokens}) exceed the model's {self.model.max_position_embeddings} positions")
        codec = await self._stored_layout(args.prefix_id, primary, cls)
        job = QueryJob(query, chunks.num_tokens, args.max_new_tokens, self.model.eos_token_ids, on_token,
                       resident=[] if args.measure_floor else None)
        staged = cls.staged_bytes(codec, params)
        resident_s = None
        async with self.admission.slot(staged):
            policy, loader, outcome = await self._load_and_answer(args.prefix_id, cls, codec, chunks, params, job,
                                                                  staged)
            ttft_s = time.perf_counter() - start - outcome.decode_s
            if args.measure_floor:  # off the clock; recompute loads nothing, its floor is its own compute
                resident_s = outcome.first_token_s if not job.resident else await self._resident(job, outcome)
        self._report(args.prefix_id, codec.name, policy.attention_report())
        fetch_s = (loader.last_arrival_at or 0.0) - (loader.first_request_at or 0.0)
        return ReprefillReport(
            token_id=outcome.token_id, text=self.decode([outcome.token_id]), policy=cls.name, budget=params.budget,
            prefix_tokens=chunks.num_tokens, query_tokens=len(query), bytes_fetched=loader.bytes_received,
            ttft_s=ttft_s, fetch_s=max(0.0, fetch_s), outcome=outcome,
            num_chunks=chunks.num_chunks, generated_text=self.decode(outcome.generated_ids),
            usage=policy.usage(), bytes_kv_record=chunks.kv_record_size, resident_s=resident_s,
            answer_text=self.decode([outcome.token_id, *outcome.generated_ids]), bytes_fetched_shm=loader.bytes_shm)

    async def _resident(self, job: QueryJob, outcome: QueryOutcome) -> float:
        """The request's compute floor (:meth:`Engine.resident`); its K/V are let go after."""
        try:
            seconds, token = await self._on_request_thread(job.cancellation, self.engine.resident, job)
        finally:
            assert job.resident is not None
            job.resident.clear()
        if token != outcome.token_id:  # the same K/V and kernels: anything else is a bug to look at
            log.warning("resident re-run answered token %d, the request %d", token, outcome.token_id)
        return seconds

    async def _load_and_answer(self, prefix_id: str, cls: type[LoadingPolicy], codec: LayoutCodec,
                               chunks: ContiguousLayout, params: PolicyParams, job: QueryJob,
                               staged: int) -> tuple[LoadingPolicy, KVLoader, QueryOutcome]:
        """Open the Fetch stream, run the policy's loading and the query; the stream is closed and
        every wait woken however this ends. The stream is read no faster than the request may hold
        records: ``staged`` bytes (what admission reserved), or a few batches at least."""
        loop = asyncio.get_running_loop()
        stream = await self.cache.open_stream(prefix_id, codec.name, self.config.fetch_batch_bytes,
                                              self.config.fetch_streams)
        held = max(staged, 4 * self.config.fetch_batch_bytes)
        loader = KVLoader(codec, stream, loop, self.runner.device, self._stager, max_held_bytes=held)
        io = asyncio.create_task(loader.run())
        job.cancellation.on_cancel(lambda: loop.call_soon_threadsafe(io.cancel))  # wakes every wait
        try:
            policy = self.policies.create(cls.name, PolicyContext(loader, codec, chunks, self.projector, params,
                                                                         self.ident_cache, prefix_id,
                                                                         self.score_dtype, self.look_ahead,
                                                                         self.config.score_heads,
                                                                         self.config.score_window))
            await policy.start_load_kv()
            outcome = await self._on_request_thread(job.cancellation, policy.compute, self.engine, job)
        except asyncio.CancelledError:
            job.cancellation.cancel()
            raise
        except ComputeError:
            if job.cancellation.cancelled:  # a wait woken by the cancellation: report why it was cancelled
                raise job.cancellation.error from None
            raise
        finally:
            io.cancel()
            await stream.close()
        return policy, loader, outcome

    def _report(self, prefix_id: str, layout_name: str, scores: list[RegionScores]) -> None:
        """Send the observed attention per record to the cache server, off the request's path."""
        if not scores:
            return
        task = asyncio.create_task(self.cache.report_attention(prefix_id, layout_name, scores))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def close(self) -> None:
        for cancellation in list(self._running):
            cancellation.cancel(Unavailable("the compute server is shutting down"))
        self.scheduler.close()
        self._requests.shutdown(wait=False, cancel_futures=True)
        self._stager.shutdown(wait=False, cancel_futures=True)
        self.look_ahead.shutdown()
