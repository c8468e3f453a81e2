"""Typed results of the SDK (frozen dataclasses, no protobuf)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegisteredPrefix:
    """A prefix stored on the cache tier; ``prefix_id`` names it in later queries."""

    prefix_id: str
    num_tokens: int
    num_chunks: int
    chunk_size: int
    already_registered: bool
    bytes_stored: int
    prefill_ms: float
    store_ms: float


@dataclass(frozen=True)
class LayerTiming:
    """One layer: time blocked on records and computing; K/V bytes read, identification-only bytes
    read, and bytes of the K/V it attended to."""

    layer: int
    wait_ms: float
    compute_ms: float
    bytes: int = 0
    bytes_identification: int = 0
    bytes_selected: int = 0
    ident_wait_ms: float = 0.0
    """Part of ``wait_ms`` blocked on identification data, not K/V records."""


@dataclass(frozen=True)
class TokenLayerSelection:
    """What a token-level baseline (h2o, impress) chose at one layer.

    ``tokens`` kept per KV head; ``shared``: one set served every head (false when impress fell back
    to all keys); ``similarity``/``threshold``: impress's probe-head Jaccard and t = j^alpha (-1 for
    h2o); ``blocks``: 64-token blocks holding the selected tokens.
    """

    layer: int
    tokens: int
    shared: bool
    similarity: float
    threshold: float
    blocks: int


@dataclass(frozen=True)
class PeriodSelection:
    """Chunks one period of layers attended to, and how well the shipped-ahead prediction did."""

    period: int
    first_layer: int
    num_layers: int
    chunks: tuple[int, ...]
    predicted: int
    predicted_hits: int
    recall: float
    mass_recall: float = -1.0


@dataclass(frozen=True)
class Timings:
    """Server-side timings in milliseconds; ``ttft_ms`` is request start to first token."""

    ttft_ms: float
    fetch_wait_ms: float
    compute_ms: float
    fetch_ms: float
    total_ms: float
    layers: tuple[LayerTiming, ...]
    record_wait_ms: float = 0.0
    """Blocked on K/V records; with ``ident_wait_ms`` it makes ``fetch_wait_ms``."""
    ident_wait_ms: float = 0.0
    """Blocked on identification data (keys, digests) the speculation did not hide."""
    resident_compute_ms: float = -1.0
    """With ``measure_floor``: the model compute of the same query over the same prefix K/V held
    resident (no I/O, no selection, no record decoding), else -1."""
    overhead_ms: float = -1.0
    """With ``measure_floor``: ``ttft_ms`` minus the waits and ``resident_compute_ms`` (selection
    scoring, record decoding and staging, Python), else -1."""
    selection_ms: float = 0.0
    """Selecting chunks or tokens on the request's thread: identification decoding, scoring,
    speculative projections (waits excluded)."""
    staging_ms: float = 0.0
    """Gathering arrived records into tensors and joining them with the query's own K/V."""
    model_ms: float = 0.0
    """The model's own ops during the request (queueing behind other requests' ops included)."""
    other_ms: float = 0.0
    """The rest of ``ttft_ms``: ``ttft_ms = fetch_wait_ms + selection_ms + staging_ms + model_ms + other_ms``."""


@dataclass(frozen=True)
class ReprefillResult:
    """The first token of prefix + query (and any further greedy tokens), and what it cost."""

    token_id: int
    text: str
    policy: str
    budget: float
    timings: Timings
    bytes_fetched: int
    prefix_tokens: int
    query_tokens: int
    generated_ids: tuple[int, ...]
    generated_text: str
    chunks_loaded: int
    """Units of KV read per layer, on average: ContiguousChunks (of ``num_chunks``), but 64-token
    blocks for `h2o` and `impress` (a block is four chunks); ``bytes_kv`` compares across policies."""
    num_chunks: int
    logits: tuple[float, ...] = ()
    """Last-position logits, only when the request asked for them (``return_logits=True``)."""
    periods: tuple[PeriodSelection, ...] = ()
    prediction_hit_rate: float = 1.0
    recall: float = -1.0
    """contiguous+ with ``evaluate_recall``: mean recall of the exact top-k; else -1."""
    bytes_identification: int = 0
    bytes_kv: int = 0
    bytes_wasted: int = 0
    bytes_selected: int = 0
    """Bytes of the K/V the layers attended to, summed over layers."""
    read_amplification: float = 0.0
    """``bytes_kv / bytes_selected`` (identification reads apart); 0 for recompute."""
    token_layers: tuple[TokenLayerSelection, ...] = ()
    mass_recall: float = -1.0
    """With ``evaluate_recall``: exact attention mass of the chosen chunks over the exact top-k's."""
    bytes_identification_cached: int = 0
    """Identification bytes the compute server had resident (no I/O)."""
    answer_text: str = ""
    """The first token and the generated ones decoded as one sequence (special tokens skipped)."""
    bytes_fetched_shm: int = 0
    """Of ``bytes_fetched``, the bytes that came through the co-located shared-memory plane."""

    @property
    def answer(self) -> str:
        """The answer's text: the first token and the generated ones decoded together (from a server
        that predates ``answer_text``: the two texts joined)."""
        return self.answer_text or self.text + self.generated_text


@dataclass(frozen=True)
class GeneratedToken:
    """One streamed token; ``index`` 0 is the Re-Prefill's first token."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class PolicyInfo:
    """One loading policy a server serves: the stored layout it reads (register the prefix with it),
    whether it honours a budget, whether it loads stored KV at all, its default period."""

    name: str
    layout: str
    selective: bool
    loads_kv: bool
    default_period: int


@dataclass(frozen=True)
class ModelInfo:
    """What a compute server runs."""

    name: str
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    has_tokenizer: bool
    dtype: str
    device: str
    chunk_size: int
    policies: tuple[str, ...]
    policy_info: tuple[PolicyInfo, ...] = ()
    extra_layouts: tuple[str, ...] = ()
    """Layouts a registration may store besides `contiguous` (``register(..., extra_layouts=...)``)."""
    score_dtype: str = ""
    """What the chunk scorers' q.k matmuls run in: ``float32`` or ``bfloat16`` (``--score-dtype``)."""
    score_heads: str = ""
    """How the per-layer chunk scorers combine query heads: ``sum`` or ``max`` (``--score-heads``;
    empty from a server older than the setting, which sums)."""
    score_window: int = 0
    """The query's last this many tokens score chunks in the per-layer scorers (``--score-window``;
    0: every token, also from a server older than the setting)."""

    def policy(self, name: str) -> PolicyInfo:
        """The description of policy ``name``; KeyError when the server does not serve it."""
        for info in self.policy_info:
            if info.name == name:
                return info
        raise KeyError(name)
