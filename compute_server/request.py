"""What a compute-server request asks for and what it reports, without gRPC or torch at the edges.

The servicer decodes protos into these, :class:`~.core.ComputeCore` fills them, tracing reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: keeps this module free of torch
    from contiguouskv.compute_server.engine import QueryOutcome
    from contiguouskv.compute_server.policies.base import LoadUsage


@dataclass(frozen=True)
class ReprefillArgs:
    """A decoded Re-Prefill request; ``query`` is text or token ids; None means the policy's default."""

    prefix_id: str
    query: str | list[int]
    policy: str = ""  # empty: the server's default policy
    budget: float | None = None
    max_new_tokens: int = 0
    period: int | None = None
    sub_period: int | None = None
    return_logits: bool = False
    evaluate_recall: bool = False
    measure_floor: bool = False


@dataclass(frozen=True)
class ReprefillReport:
    """What one Re-Prefill computed, read and how long it took (the server's side of the response)."""

    token_id: int
    text: str
    policy: str
    budget: float
    prefix_tokens: int
    query_tokens: int
    bytes_fetched: int
    ttft_s: float
    fetch_s: float
    outcome: "QueryOutcome"
    num_chunks: int
    generated_text: str
    usage: "LoadUsage"
    bytes_kv_record: int
    resident_s: float | None = None  # with measure_floor: the query over the same K/V held resident
    answer_text: str = ""  # the first token and the generated ones decoded as one sequence
    bytes_fetched_shm: int = 0  # of bytes_fetched, those placed in shared memory (the co-located plane)


@dataclass(frozen=True)
class RegisterReport:
    """What a registration stored."""

    prefix_id: str
    num_tokens: int
    num_chunks: int
    chunk_size: int
    already_registered: bool
    bytes_stored: int
    prefill_s: float
    store_s: float
