"""The compute server's request logic, without gRPC: register prefixes and run Re-Prefill.

Runs on the server's event loop; model work goes to a single compute thread so requests never run
two forward passes at once, and fetch traffic keeps flowing while a layer computes.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.config import ComputeServerConfig
from contiguouskv.compute_server.engine import Engine, QueryOutcome
from contiguouskv.compute_server.errors import FailedPrecondition, InvalidArgument, NotFound
from contiguouskv.compute_server.policies.feedback import RegionScores, attention_report
from contiguouskv.compute_server.policies.h2o import prefill_with_token_importance
from contiguouskv.compute_server.policies.impress import LayerSelection, TokenPolicy
from contiguouskv.compute_server.layouts.impress import ImpressLayout
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout, Region
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.model.loading import LoadedModel
from contiguouskv.compute_server.layouts.packing import dtype_name, iter_impress_payloads, iter_region_payloads, unpack_tokens
from contiguouskv.compute_server.policies.base import (
    POLICY_NAMES, TOKEN_POLICY_NAMES, PeriodicPolicy, PeriodSelection, Policy, make_policy,
)
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.observability.tracing import traced_reprefill

PREFIX_ID = re.compile(r"^[0-9a-f]{32}$")
EXTRA_LAYOUTS = ("impress",)
"""Layouts a registration may ask for besides `contiguous` (always stored)."""
T = TypeVar("T")
L = TypeVar("L")


def prefix_id_for(fingerprint: str, token_ids: list[int]) -> str:
    """Content hash of (model fingerprint, tokens): the prefix's id on every cache shard."""
    h = hashlib.sha256(fingerprint.encode() + b"\0")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.hexdigest()[:32]


def _stored_layout(parse: Callable[[bytes], tuple[L, dict[str, object]]], metadata: bytes, prefix_id: str,
                   layout_name: str) -> tuple[L, dict[str, object]]:
    """``parse(metadata)`` of a stored object; FAILED_PRECONDITION when it cannot be read (an object
    stored under a compute layout's name by some other writer), instead of a failure inside."""
    try:
        return parse(metadata)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FailedPrecondition(f"prefix_id {prefix_id}: the stored {layout_name} object has unreadable metadata "
                                 f"({type(exc).__name__}: {str(exc)[:120]}); delete it and register the prefix again")


@dataclass(frozen=True)
class ReprefillArgs:
    """A decoded Re-Prefill request; ``query`` is text or token ids."""

    prefix_id: str
    query: str | list[int]
    policy: str = "full"
    budget: float | None = None
    max_new_tokens: int = 0
    period: int | None = None
    sub_period: int | None = None
    return_logits: bool = False
    evaluate_recall: bool = False


@dataclass
class ReprefillResult:
    token_id: int
    text: str
    policy: str
    budget: float
    prefix_tokens: int
    query_tokens: int
    bytes_fetched: int
    ttft_s: float
    fetch_s: float
    outcome: QueryOutcome
    num_chunks: int
    generated_text: str
    usage: "LoadUsage"
    bytes_kv_record: int


@dataclass(frozen=True)
class LoadUsage:
    """What a request read and selected; see ReprefillResponse in compute.proto.

    ``layer_chunks`` counts ContiguousChunks per layer, or 64-token blocks for h2o/impress. Per layer
    ``layer_bytes`` are K/V record bytes read, ``layer_identification`` identification-only bytes,
    ``layer_selected`` the bytes of the K/V attended to.
    """

    periods: tuple[PeriodSelection, ...]
    layer_chunks: tuple[int, ...]
    prediction_hit_rate: float
    recall: float
    bytes_identification: int
    bytes_kv: int
    bytes_wasted: int
    layer_bytes: tuple[int, ...] = ()
    layer_identification: tuple[int, ...] = ()
    layer_selected: tuple[int, ...] = ()
    token_layers: tuple[LayerSelection, ...] = ()

    @property
    def bytes_selected(self) -> int:
        return sum(self.layer_selected)

    @property
    def read_amplification(self) -> float:
        """K/V bytes read per byte attended to (identification apart); 0 when nothing was selected."""
        return self.bytes_kv / self.bytes_selected if self.bytes_selected else 0.0

    @classmethod
    def of(cls, loader: KVLoader, policy: Policy | None) -> "LoadUsage":
        if isinstance(policy, TokenPolicy):
            return cls._of_tokens(loader, policy)
        lay = loader.layout
        layers = range(lay.num_layers)
        counts = tuple(len(policy.chunks_at(l)) for l in layers) if policy is not None else tuple(0 for _ in layers)
        used = sum(counts) * lay.kv_record_size
        periods = tuple(policy.periods) if policy is not None else ()
        recalls = [p.recall for p in periods if p.recall >= 0]
        per_token = lay.kv_record_size // lay.chunk_size  # K and V of one token, all KV heads
        selected = tuple(lay.tokens_in(policy.chunks_at(l)) * per_token if policy is not None else 0 for l in layers)
        ident = [0] * lay.num_layers
        if isinstance(policy, PeriodicPolicy):
            size = lay.num_chunks * lay.token_bytes if policy.ident_region == "idkeys" else lay.digest_record_size
            for start in policy.starts:
                ident[start] = size
        return cls(periods, counts, policy.prediction_hit_rate if policy is not None else 1.0,
                   sum(recalls) / len(recalls) if recalls else -1.0,
                   loader.bytes_by_category.get("ident", 0), loader.bytes_by_category.get("kv", 0),
                   max(0, loader.kv_records_received * lay.kv_record_size - used),
                   tuple(c * lay.kv_record_size for c in counts), tuple(ident), selected)

    @classmethod
    def _of_tokens(cls, loader: KVLoader, policy: TokenPolicy) -> "LoadUsage":
        sels = tuple(policy.selections)
        return cls((), tuple(len(s.blocks) for s in sels), 1.0, -1.0,
                   loader.bytes_by_category.get("ident", 0), loader.bytes_by_category.get("kv", 0), 0,
                   tuple(s.bytes_kv for s in sels), tuple(s.bytes_identification for s in sels),
                   tuple(s.bytes_selected for s in sels), sels)


@dataclass(frozen=True)
class RegisterResult:
    prefix_id: str
    num_tokens: int
    num_chunks: int
    chunk_size: int
    already_registered: bool
    bytes_stored: int
    prefill_s: float
    store_s: float


class ComputeCore:
    """Registers prefixes and answers queries for one loaded model."""

    def __init__(self, config: ComputeServerConfig, model: LoadedModel, runner: ModelRunner, cache: CacheClient) -> None:
        self.config = config
        self.model = model
        self.runner = runner
        self.cache = cache
        self.engine = Engine(runner, prefill_block=config.prefill_block, importance_window=config.importance_window)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.kv_dtype = dtype_name(runner.dtype)
        self._reports: set[asyncio.Task[None]] = set()

    @property
    def layout_name(self) -> str:
        return f"contiguous-c{self.config.chunk_size}-g{self.config.group_size}"

    # --- tokens ----------------------------------------------------------------------------------
    def tokens(self, value: str | list[int], field_name: str) -> list[int]:
        """Token ids of text or of given ids, validated against the vocabulary."""
        m = self.model
        if isinstance(value, str):
            if m.tokenizer is None:
                raise InvalidArgument(f"{field_name}: model {m.name} has no tokenizer; send token ids")
            ids = list(m.tokenizer.encode(value, add_special_tokens=False))
        else:
            ids = list(value)
        if not ids:
            raise InvalidArgument(f"{field_name}: empty")
        bad = [t for t in ids if not 0 <= t < m.vocab_size]
        if bad:
            raise InvalidArgument(f"{field_name}: token id {bad[0]} outside the vocabulary [0, {m.vocab_size})")
        return ids

    def decode(self, ids: list[int]) -> str:
        tok = self.model.tokenizer
        return tok.decode(ids) if tok is not None else ""

    async def _compute(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` on the single compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- register --------------------------------------------------------------------------------
    def _impress_for(self, layout: ContiguousLayout) -> ImpressLayout:
        """The `impress` layout of the prefix whose `contiguous` layout is ``layout``."""
        return ImpressLayout(layout.num_tokens, layout.num_layers, self.model.num_attention_heads,
                             layout.num_kv_heads, layout.head_dim, layout.dtype)

    async def register(self, prefix: str | list[int], extra_layouts: Sequence[str] = ()) -> RegisterResult:
        """Prefill once and store the `contiguous` layout plus any ``extra_layouts`` not stored yet."""
        unknown = sorted(set(extra_layouts) - set(EXTRA_LAYOUTS) - {"contiguous"})
        if unknown:
            raise InvalidArgument(f"extra_layouts: unknown layout {unknown[0][:40]!r}; "
                                  f"choose from {', '.join(EXTRA_LAYOUTS)}")
        ids = self.tokens(prefix, "prefix")
        limit = min(self.config.max_prefix_tokens, self.model.max_position_embeddings - 1)
        if len(ids) > limit:
            which = "max_prefix_tokens" if limit == self.config.max_prefix_tokens else "the model's positions - 1"
            raise InvalidArgument(f"prefix: {len(ids)} tokens, more than the limit of {limit} ({which})")
        m = self.model
        layout = ContiguousLayout(len(ids), m.num_layers, m.num_kv_heads, m.head_dim, self.kv_dtype,
                                  self.config.chunk_size, self.config.group_size)
        blocks = self._impress_for(layout) if "impress" in extra_layouts else None
        prefix_id = prefix_id_for(m.fingerprint, ids)
        wanted = [layout.name] + ([blocks.name] if blocks is not None else [])
        missing = {name for name in wanted if await self.cache.get_manifest(prefix_id, name, everywhere=True) is None}
        if not missing:
            return RegisterResult(prefix_id, len(ids), layout.num_chunks, layout.chunk_size, True, 0, 0.0, 0.0)
        t0 = time.perf_counter()
        if blocks is None:
            kv, token_importance = await self._compute(self.engine.prefill_prefix, ids, layout), None
        else:
            kv, token_importance = await self._compute(
                prefill_with_token_importance, self.runner, ids, layout, self.config.prefill_block,
                self.config.importance_window)
        prefill_s = time.perf_counter() - t0
        batch = self.config.fetch_batch_bytes
        metadata = dict(model_fingerprint=m.fingerprint, model_name=m.name)
        stores: list[tuple[str, list[Region], bytes, Callable[[], list[tuple[str, int, memoryview]]]]] = []
        if layout.name in missing:
            stores.append((layout.name, layout.regions(), layout.to_metadata(**metadata), lambda: list(
                iter_region_payloads(layout, kv.keys, kv.values, kv.importance, ids, batch))))
        if blocks is not None and blocks.name in missing:
            stores.append((blocks.name, blocks.regions(), blocks.to_metadata(**metadata), lambda: list(
                iter_impress_payloads(blocks, kv.keys, kv.values, token_importance, batch))))
        already, written, pack_s, store_s = True, 0, 0.0, 0.0
        for name, regions, meta, pack in stores:  # one layout's payloads in memory at a time
            t1 = time.perf_counter()
            payloads = await self._compute(pack)
            t2 = time.perf_counter()
            reply = await self.cache.put_prefix(prefix_id, name, regions, meta, payloads)
            del payloads
            pack_s, store_s = pack_s + t2 - t1, store_s + time.perf_counter() - t2
            already, written = already and reply.already_committed, written + reply.bytes_written
        return RegisterResult(prefix_id, len(ids), layout.num_chunks, layout.chunk_size,
                              already, written, prefill_s + pack_s, store_s)

    # --- reprefill -------------------------------------------------------------------------------
    def _validate(self, args: ReprefillArgs) -> tuple[str, float, int, int]:
        if not PREFIX_ID.match(args.prefix_id):
            raise InvalidArgument(f"prefix_id: {args.prefix_id[:80]!r} is not 32 lowercase hex digits")
        policy = args.policy or "full"
        if policy not in POLICY_NAMES:
            raise InvalidArgument(f"policy: unknown {policy[:40]!r}; choose one of {', '.join(POLICY_NAMES)}")
        budget = 1.0 if args.budget is None else args.budget
        if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise InvalidArgument(f"budget: {budget} is outside (0, 1]")
        if not 0 <= args.max_new_tokens <= self.config.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens: {args.max_new_tokens} is outside [0, {self.config.max_new_tokens}]")
        default = self.config.plus_default_period if policy == "contiguous+" else self.config.default_period
        period = default if args.period is None else args.period
        sub = min(period, self.config.default_sub_period) if args.sub_period is None else args.sub_period
        if period < 1 or sub < 1 or sub > period:
            raise InvalidArgument(f"period/sub_period: need 1 <= sub_period <= period, got {sub} and {period}")
        return policy, budget, period, sub

    async def _manifest_layout(self, prefix_id: str) -> ContiguousLayout:
        manifest = await self.cache.get_manifest(prefix_id, self.layout_name)
        if manifest is None:
            raise NotFound(f"prefix_id: {prefix_id} is not registered (layout {self.layout_name})")
        layout, extra = _stored_layout(ContiguousLayout.from_metadata, manifest.metadata, prefix_id, self.layout_name)
        if extra.get("model_fingerprint") != self.model.fingerprint:
            raise FailedPrecondition(
                f"prefix_id: {prefix_id} was stored for model {extra.get('model_name')!r} "
                f"(fingerprint {str(extra.get('model_fingerprint'))[:12]}), this server runs "
                f"{self.model.name!r} (fingerprint {self.model.fingerprint[:12]})")
        return layout

    async def _impress_layout(self, prefix_id: str, layout: ContiguousLayout, policy: str) -> ImpressLayout:
        """The prefix's stored `impress` layout; FAILED_PRECONDITION when it was not registered."""
        want = self._impress_for(layout)
        manifest = await self.cache.get_manifest(prefix_id, want.name)
        if manifest is None:
            raise FailedPrecondition(
                f"policy {policy}: prefix_id {prefix_id} was registered without the impress layout (64-token "
                f"K/V blocks, probe keys, h2o scores); register it with `contiguouskv register --layouts impress` "
                f"(SDK: register(..., extra_layouts=['impress']))")
        stored, _ = _stored_layout(ImpressLayout.from_metadata, manifest.metadata, prefix_id, want.name)
        if stored != want:
            raise FailedPrecondition(f"policy {policy}: prefix_id {prefix_id} has impress layout {stored}, "
                                     f"this server expects {want}")
        return want

    @traced_reprefill
    async def reprefill(self, args: ReprefillArgs, on_token: Callable[[int], None] | None = None) -> ReprefillResult:
        """Load prefix KV by the request's policy, compute the query, return the first token."""
        start = time.perf_counter()
        policy_name, budget, period, sub = self._validate(args)
        query = self.tokens(args.query, "query")
        if len(query) > self.config.max_query_tokens:
            raise InvalidArgument(f"query: {len(query)} tokens, more than the limit of {self.config.max_query_tokens} "
                                  f"(max_query_tokens)")
        layout = await self._manifest_layout(args.prefix_id)
        total = layout.num_tokens + len(query) + args.max_new_tokens
        if total > self.model.max_position_embeddings:
            raise InvalidArgument(f"query: prefix ({layout.num_tokens}) + query ({len(query)}) + max_new_tokens "
                                  f"({args.max_new_tokens}) exceed the model's {self.model.max_position_embeddings} positions")
        blocks = await self._impress_layout(args.prefix_id, layout, policy_name) \
            if policy_name in TOKEN_POLICY_NAMES else None
        stream_layout = blocks.name if blocks is not None else layout.name
        stream = await self.cache.open_stream(args.prefix_id, stream_layout, self.config.fetch_batch_bytes)
        loader = KVLoader(layout, stream, asyncio.get_running_loop(), self.runner.device, self._stager)
        io = asyncio.create_task(loader.run())
        eos = self.model.eos_token_ids
        policy: Policy | None = None
        try:
            if policy_name == "recompute":
                tokens = loader.start_blob("tokens", [0])
                prefix_ids = unpack_tokens((await asyncio.wrap_future(tokens))[0])
                outcome = await self._compute(self.engine.recompute, prefix_ids, query, args.max_new_tokens, eos, on_token)
            else:
                policy = make_policy(policy_name, loader, self.runner, budget, period, sub, args.evaluate_recall,
                                     blocks)
                await policy.start()
                outcome = await self._compute(self.engine.answer, query, layout.num_tokens, policy,
                                              args.max_new_tokens, eos, on_token)
        finally:
            io.cancel()
            await stream.close()
        if isinstance(policy, TokenPolicy):
            self._report(args.prefix_id, stream_layout, policy.attention_report())
        elif policy is not None and policy.periods:
            self._report(args.prefix_id, layout.name, attention_report(layout, policy))
        fetch_s = (loader.last_arrival_at or 0.0) - (loader.first_request_at or 0.0)
        return ReprefillResult(
            token_id=outcome.token_id, text=self.decode([outcome.token_id]), policy=policy_name,
            budget=budget if policy_name not in ("full", "recompute") else 1.0,
            prefix_tokens=layout.num_tokens, query_tokens=len(query), bytes_fetched=loader.bytes_received,
            ttft_s=time.perf_counter() - start - outcome.decode_s, fetch_s=max(0.0, fetch_s), outcome=outcome,
            num_chunks=layout.num_chunks, generated_text=self.decode(outcome.generated_ids),
            usage=LoadUsage.of(loader, policy), bytes_kv_record=layout.kv_record_size)

    def _report(self, prefix_id: str, layout_name: str, scores: list[RegionScores]) -> None:
        """Send the observed attention per record to the cache server, off the request's path."""
        task = asyncio.create_task(self.cache.report_attention(prefix_id, layout_name, scores))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stager.shutdown(wait=False, cancel_futures=True)
