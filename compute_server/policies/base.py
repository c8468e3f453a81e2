"""Loading policies: which prefix KV a Re-Prefill reads, and when. This docstring is the contract.

A loading policy is created per request (by :class:`~.registry.PolicyRegistry`) with a
:class:`PolicyContext`: the request's :class:`~..kvio.loader.KVLoader` (start/wait pairs over one
Fetch stream of the layout the policy reads), that layout's codec, a narrow :class:`Projector`
(project a hidden state to a layer's queries and keys, the attention scale) and its
:class:`PolicyParams`. The compute server then calls, in this order:

1. :meth:`LoadingPolicy.start_load_kv` — on the event loop, once, before layer 0. Ships the
   first requests (or everything a static policy needs). May await small reads (statistics) it
   must have to decide; must not wait for K/V.
2. :meth:`LoadingPolicy.compute` — on the compute thread, once; by default runs the query layer by
   layer through the engine, which for each layer ``l`` calls:

   a. :meth:`LoadingPolicy.before_layer` (``l``, hidden state entering ``l``) — a chance to look
      ahead (score layer ``l + 1`` speculatively, ship its requests). Default: nothing. Must not
      block on records of later layers.
   b. :meth:`LoadingPolicy.wait_for_layer_load` (``l``, the query's q and k at ``l``) — **blocks**
      until the prefix K/V layer ``l`` attends to are in; returns them and the seconds blocked.
      The only abstract method besides :meth:`start_load_kv`.
   c. :meth:`LoadingPolicy.layer_consumed` (``l``) — the engine copied those K/V into its attention
      input; the tensors ``wait_for_layer_load`` returned may be reused from here on (by default the
      loader's gather buffers are), so a policy must not keep them.

   Selection work on this thread (decoding identification data, scoring) goes inside
   ``with self.selecting():``, so that the response reports it as ``selection_ms``.

   A policy that loads no KV (``loads_kv = False``, e.g. ``recompute``) overrides ``compute``.
3. After the answer, on the event loop: :meth:`LoadingPolicy.usage` (what was read and selected,
   for the response) and :meth:`LoadingPolicy.attention_report` (per-record feedback for the cache
   server's DRAM cache; default none).

A policy declares, as class attributes: its ``name`` (what clients send), the stored ``layout``
kind it reads (``contiguous`` unless it says otherwise; registration must have stored it),
whether it ``loads_kv`` at all, whether it is ``selective`` (honours the budget; a policy that is
not reports budget 1.0), and its ``default_period`` (None: the server's ``default_period``).
Every wait it makes goes through the loader, so a failed stream or a cancelled request wakes it
with an error instead of leaving the compute thread blocked.

Adding a policy = one module with a :class:`LoadingPolicy` subclass + one line in
:data:`~.registry.BUILTIN_POLICIES` (or ``--policy-plugin module:Class`` without editing the
server); ``docs/architecture.md`` has a worked example.
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from contiguouskv.compute_server.cachenet.attention import RegionScores
from contiguouskv.compute_server.engine import Engine, QueryJob, QueryOutcome
from contiguouskv.compute_server.kvio.identcache import IdentCache
from contiguouskv.compute_server.kvio.loader import KVLoader
from contiguouskv.compute_server.layouts.base import LayoutCodec
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.lookahead import LookAhead

STATS_PRIORITY = -(1 << 20)
"""Fetch priority of small reads a policy needs before anything else (statistics, scores)."""


class Projector(Protocol):
    """The part of the model a policy may use: a layer's query/key projections and the scale."""

    @property
    def scaling(self) -> float: ...

    @property
    def device(self) -> torch.device: ...

    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, *,
                aside: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q ``[heads, T, d]``, k and v ``[kv_heads, T, d]`` of ``hidden`` ``[T, D]`` at ``layer``.

        ``aside``: called off the request's thread (a look-ahead), so the layer passes need not
        wait for a next op of the calling thread."""
        ...


@dataclass(frozen=True)
class PolicyParams:
    """A request's loading parameters, validated: ``budget`` in (0, 1] (1.0 for a policy that is not
    selective), ``1 <= sub_period <= period``."""

    budget: float = 1.0
    period: int = 8
    sub_period: int = 4
    evaluate_recall: bool = False


@dataclass(frozen=True)
class PolicyContext:
    """What a policy works with for one request.

    ``codec``: the stored layout the policy reads (its ``layout`` kind); ``chunks``: the prefix's
    `contiguous` geometry (stored for every prefix: token count, chunking, layers).
    """

    loader: KVLoader
    codec: LayoutCodec
    chunks: ContiguousLayout
    projector: Projector
    params: PolicyParams
    ident_cache: IdentCache | None = None
    """The server's resident identification data (None: every request reads its own)."""
    prefix_id: str = ""
    score_dtype: torch.dtype = torch.float32
    """What the chunk scorers' q.k matmuls run in (:func:`~..selection.chunks.score_dtype`)."""
    ahead: LookAhead | None = None
    """The server's look-ahead thread(s), which also count where look-ahead work ran (None: a
    policy's look-ahead runs on the request's thread, uncounted)."""
    score_heads: str = "sum"
    """How the per-layer scorers combine query heads (config ``score_heads``: ``sum`` or ``max``)."""
    score_window: int = 0
    """The query's last this many tokens score chunks in the per-layer scorers (config
    ``score_window``; 0: every token)."""


@dataclass
class PeriodChoice:
    """What one period of a periodic policy selected, and how well its prediction did."""

    period: int
    first_layer: int
    num_layers: int
    chunks: list[int]
    predicted: int = 0
    predicted_hits: int = 0
    recall: float = -1.0
    mass_recall: float = -1.0
    scores: torch.Tensor | None = None  # float32 [m] on the host: for the cache report


@dataclass
class LayerSelection:
    """What a token-level policy read and attended to at one layer."""

    layer: int
    tokens: torch.Tensor = field(repr=False)  # int64 [kv_heads, k] on the host, ascending; rows equal when shared
    shared: bool
    blocks: list[int] = field(repr=False)  # K/V blocks holding the selected tokens
    bytes_identification: int = 0
    bytes_kv: int = 0
    bytes_selected: int = 0
    similarity: float = -1.0
    threshold: float = -1.0
    scores: torch.Tensor | None = field(default=None, repr=False)  # float32 [n] on the host: for the cache report
    fetched_blocks: dict[str, list[int]] = field(default_factory=dict, repr=False)  # region -> blocks read


@dataclass(frozen=True)
class LoadUsage:
    """What a request read and selected; see ReprefillResponse in compute.proto.

    ``layer_chunks`` counts the layout's units per layer (ContiguousChunks, or 64-token blocks for
    the token-level baselines). Per layer ``layer_bytes`` are K/V record bytes read,
    ``layer_identification`` identification-only bytes read, ``layer_selected`` the bytes of the K/V
    attended to, ``layer_ident_wait`` the seconds blocked on identification data.
    """

    periods: tuple[PeriodChoice, ...] = ()
    layer_chunks: tuple[int, ...] = ()
    prediction_hit_rate: float = 1.0
    recall: float = -1.0
    bytes_identification: int = 0
    bytes_kv: int = 0
    bytes_wasted: int = 0
    layer_bytes: tuple[int, ...] = ()
    layer_identification: tuple[int, ...] = ()
    layer_selected: tuple[int, ...] = ()
    token_layers: tuple[LayerSelection, ...] = ()
    mass_recall: float = -1.0
    layer_ident_wait: tuple[float, ...] = ()
    bytes_identification_cached: int = 0

    @property
    def bytes_selected(self) -> int:
        return sum(self.layer_selected)

    @property
    def read_amplification(self) -> float:
        """K/V bytes read per byte attended to (identification apart); 0 when nothing was selected."""
        return self.bytes_kv / self.bytes_selected if self.bytes_selected else 0.0


def chunk_usage(loader: KVLoader, layout: ContiguousLayout, chunks_at: Callable[[int], Sequence[int]],
                periods: Sequence[PeriodChoice] = (), identification: Sequence[int] = (),
                prediction_hit_rate: float = 1.0, recalls: Sequence[tuple[float, float]] = (),
                ident_wait: Sequence[float] = (), ident_cached: int = 0) -> LoadUsage:
    """The usage of a policy that reads the `contiguous` layout's K/V records by chunk.

    ``chunks_at(layer)``: the chunks the layer attended to; ``identification``: identification
    bytes read per layer (zeros when empty); ``recalls``: (set, mass) recall of the exact top-k per
    evaluated layer; ``ident_wait``: seconds blocked on identification data per layer.
    """
    layers = range(layout.num_layers)
    counts = tuple(len(chunks_at(l)) for l in layers)
    per_token = layout.kv_record_size // layout.chunk_size  # K and V of one token, all KV heads
    used = sum(counts) * layout.kv_record_size
    return LoadUsage(
        periods=tuple(periods), layer_chunks=counts, prediction_hit_rate=prediction_hit_rate,
        recall=sum(r for r, _ in recalls) / len(recalls) if recalls else -1.0,
        mass_recall=sum(m for _, m in recalls) / len(recalls) if recalls else -1.0,
        layer_ident_wait=tuple(ident_wait) or tuple(0.0 for _ in layers), bytes_identification_cached=ident_cached,
        bytes_identification=loader.bytes_by_category.get("ident", 0), bytes_kv=loader.bytes_by_category.get("kv", 0),
        bytes_wasted=max(0, loader.kv_records_received * layout.kv_record_size - used),
        layer_bytes=tuple(c * layout.kv_record_size for c in counts),
        layer_identification=tuple(identification) or tuple(0 for _ in layers),
        layer_selected=tuple(layout.tokens_in(list(chunks_at(l))) * per_token for l in layers))


class LoadingPolicy(abc.ABC):
    """Chooses and requests prefix KV for one request; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    layout: ClassVar[str] = "contiguous"
    loads_kv: ClassVar[bool] = True
    selective: ClassVar[bool] = True
    default_period: ClassVar[int | None] = None

    def __init__(self, context: PolicyContext) -> None:
        self.context = context
        self.selection_s = 0.0  # see selecting()
        self._blocked_s = 0.0  # waits for data inside selecting() blocks, added by the policy
        self.loader = context.loader
        self.chunks = context.chunks
        self.projector = context.projector
        self.params = context.params

    @classmethod
    def staged_bytes(cls, codec: LayoutCodec, params: PolicyParams) -> int:
        """What admission reserves for a request of this policy: the prefix KV bytes it may hold
        (its budget's share of the layout's K/V; all of it for a policy that is not selective, and
        for one that recomputes it)."""
        share = params.budget if cls.selective and cls.loads_kv else 1.0
        return math.ceil(codec.total_kv_bytes() * share)

    @property
    def budget(self) -> float:
        return self.params.budget

    @abc.abstractmethod
    async def start_load_kv(self) -> None:
        """Event loop, before layer 0: ship the first requests."""

    def before_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Compute thread, before ``layer``'s projections: the hidden state ``[T, D]`` entering it."""

    @abc.abstractmethod
    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Compute thread, blocks: prefix K and V for ``layer`` (``[kv_heads, s, d]`` each) given the
        query's q ``[heads, T, d]`` and k ``[kv_heads, T, d]`` there, and the seconds blocked."""

    @contextlib.contextmanager
    def selecting(self) -> Iterator[None]:
        """Times a block of selection work on the request's thread (identification decoding,
        scoring, speculative projections) into ``selection_s``; waits the policy adds to
        ``_blocked_s`` inside the block are not counted (they are record or identification waits)."""
        started, blocked = time.perf_counter(), self._blocked_s
        try:
            yield
        finally:
            self.selection_s += time.perf_counter() - started - (self._blocked_s - blocked)

    def layer_consumed(self, layer: int) -> None:
        """Compute thread: the engine copied ``layer``'s prefix K/V out; the loader may reuse their
        buffers (:meth:`.KVLoader.consumed`)."""
        self.loader.consumed(layer)

    def compute(self, engine: Engine, job: QueryJob) -> QueryOutcome:
        """Compute thread: the whole query; by default layer by layer over this policy's prefix KV."""
        return engine.answer(job, self)

    def usage(self) -> LoadUsage:
        """After the request: what it read and attended to (default: every chunk at every layer)."""
        return chunk_usage(self.loader, self.chunks, lambda layer: range(self.chunks.num_chunks))

    def attention_report(self) -> list[RegionScores]:
        """After the request: per-record attention for the cache server's DRAM cache (default none)."""
        return []
