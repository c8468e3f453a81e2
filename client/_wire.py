"""Conversion between SDK types and the wire, and gRPC errors to SDK errors. Internal."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import grpc

from contiguouskv.client.errors import (
    ERRORS_BY_STATUS, ContiguousKVError, FailedPreconditionError, InvalidArgumentError,
)
from contiguouskv.client.types import (
    GeneratedToken, LayerTiming, ModelInfo, PeriodSelection, PolicyInfo, RegisteredPrefix, ReprefillResult, Timings,
    TokenLayerSelection,
)
from contiguouskv.v1 import compute_pb2

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def to_error(err: grpc.RpcError, address: str, secure: bool = False, delivered: int = 0) -> ContiguousKVError:
    """The SDK error for ``err`` from ``address``, with a hint where gRPC's words alone mislead;
    ``secure``: whether the call went over TLS; ``delivered``: stream messages that had arrived."""
    code = err.code() if hasattr(err, "code") else None
    status = code.name if code is not None else "UNKNOWN"
    details = (err.details() if hasattr(err, "details") else str(err)) or ""
    if status == "UNAVAILABLE" and delivered:  # it was talking to us: neither TLS nor a missing server
        details = f"{details} (the connection to {address} broke after {delivered} token(s) had arrived; a " \
                  f"stream is not retried once it has delivered tokens)"
    elif status == "UNAVAILABLE" and "cache server" in details:  # the compute server answered for its shards
        details = f"{details} (the compute server at {address} cannot reach that cache server; start it with " \
                  f"`contiguouskv serve cache --root DIR --port N`)"
    elif status == "UNAVAILABLE" and _says(details, _TLS_FAILURES):
        details = f"{details} (the TLS handshake with {address} failed: check the CA bundle, the client " \
                  f"certificate the server may require, and the server name; CLI: --tls-ca-file, " \
                  f"--tls-cert-file/--tls-key-file, --tls-server-name; see docs/security.md)"
    elif status == "UNAVAILABLE" and not secure and _says(details, _CLOSED):
        details = f"{details} (the server at {address} closed the connection: a server that serves TLS " \
                  f"does that to a plaintext client, so pass its CA bundle (CLI: --tls-ca-file; SDK: " \
                  f"tls=ClientTls(ca_file=...)); otherwise, is a compute server running there?)"
    elif status == "UNAVAILABLE" and (not details or _says(details, _TRANSPORT_FAILURES)):  # never reached a server
        details = f"{details} (is a compute server running at {address}? start one with " \
                  f"`contiguouskv serve compute --model MODEL --cache HOST:PORT --port N`)"
    elif status == "DEADLINE_EXCEEDED":
        details = f"{details} (no answer from {address} in time; pass a larger timeout, CLI: --timeout)"
    cls = ERRORS_BY_STATUS.get(status, ContiguousKVError)
    return cls(details or "", status)


# How gRPC words an UNAVAILABLE of its own, when the connection failed; an UNAVAILABLE the server
# sent (draining, its cache servers unreachable) says what happened in its own words
_TRANSPORT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed", "socket closed",
                       "connection reset", "broken pipe", "no route to host", "unreachable",
                       "connections to all backends failing", "empty address list", "endpoint closing")


_TLS_FAILURES = ("ssl", "handshake", "certificate", "tls", "verification check", "peer name")
_CLOSED = ("socket closed", "connection reset", "endpoint closing")  # the peer hung up: maybe TLS


def _says(details: str, phrases: tuple[str, ...]) -> bool:
    """Whether gRPC's ``details`` contain one of ``phrases`` (case-insensitive)."""
    lowered = details.lower()
    return any(phrase in lowered for phrase in phrases)


UINT32 = 1 << 32


def _bad(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, "INVALID_ARGUMENT")


def _uint32(value: object) -> int | None:
    """``value`` as a uint32 (any integer type: int, numpy's), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
    return number if 0 <= number < UINT32 else None


def _count(name: str, value: int) -> int:
    """A non-negative integer field (the wire's uint32), checked here: protobuf would raise its own
    ValueError naming no field."""
    number = _uint32(value)
    if number is None:
        raise _bad(f"{name}: must be an integer in [0, {UINT32 - 1}], got {value!r}")
    return number


def _token_ids(name: str, ids: Sequence[int]) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise _bad(f"{name}: give token ids as a list of integers, or text as a string")
    out = []
    for position, value in enumerate(ids):
        number = _uint32(value)
        if number is None:
            raise _bad(f"{name}: token id {value!r} at position {position} is not an integer in [0, {UINT32 - 1}]")
        out.append(number)
    return out


def register_request(text: str | None, token_ids: Sequence[int] | None,
                     extra_layouts: Sequence[str] = ()) -> compute_pb2.RegisterPrefixRequest:
    if (text is None) == (token_ids is None):
        raise _bad("give exactly one of text or token_ids")
    if token_ids is not None and not hasattr(token_ids, "__iter__"):
        raise _bad(f"token_ids: give a list of integers, got {type(token_ids).__name__}")
    if isinstance(extra_layouts, str):
        raise _bad("extra_layouts: give a list of layout names, e.g. ['impress']")
    if text is not None:
        return compute_pb2.RegisterPrefixRequest(text=_text("text", text), extra_layouts=list(extra_layouts))
    ids = compute_pb2.TokenIds(ids=_token_ids("token_ids", token_ids or ()))
    return compute_pb2.RegisterPrefixRequest(token_ids=ids, extra_layouts=list(extra_layouts))


def closed() -> ContiguousKVError:
    """What a call on a closed client raises."""
    return FailedPreconditionError("the client is closed; make a new one", "FAILED_PRECONDITION")


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name}: must be a string, got {type(value).__name__}")
    return value


def reprefill_request(prefix_id: str, query: str | Sequence[int], policy: str, budget: float | None,
                      max_new_tokens: int, period: int | None, sub_period: int | None,
                      return_logits: bool = False, evaluate_recall: bool = False,
                      measure_floor: bool = False) -> compute_pb2.ReprefillRequest:
    _text("prefix_id", prefix_id)
    _text("policy", policy)
    if query is None or not isinstance(query, str) and not hasattr(query, "__iter__"):
        raise _bad(f"query: give text as a string or token ids as a list of integers, got {type(query).__name__}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise _bad(f"budget: must be a number in (0, 1], got {budget!r}")
    req = compute_pb2.ReprefillRequest(prefix_id=prefix_id, policy=policy,
                                       max_new_tokens=_count("max_new_tokens", max_new_tokens),
                                       return_logits=return_logits, evaluate_recall=evaluate_recall,
                                       measure_floor=measure_floor)
    if isinstance(query, str):
        req.text = query
    else:
        req.token_ids.ids.extend(_token_ids("query", query))
    if budget is not None:
        req.budget = budget
    if period is not None:
        req.period = _count("period", period)
    if sub_period is not None:
        req.sub_period = _count("sub_period", sub_period)
    return req


def registered(r: compute_pb2.RegisterPrefixResponse) -> RegisteredPrefix:
    return RegisteredPrefix(r.prefix_id, r.num_tokens, r.num_chunks, r.chunk_size, r.already_registered,
                            r.bytes_stored, r.prefill_ms, r.store_ms)


def result(r: compute_pb2.ReprefillResponse) -> ReprefillResult:
    t = r.timings
    timings = Timings(t.ttft_ms, t.fetch_wait_ms, t.compute_ms, t.fetch_ms, t.total_ms,
                      tuple(LayerTiming(x.layer, x.wait_ms, x.compute_ms, x.bytes, x.bytes_identification,
                                        x.bytes_selected, x.ident_wait_ms) for x in t.layers),
                      t.record_wait_ms, t.ident_wait_ms, t.resident_compute_ms, t.overhead_ms,
                      t.selection_ms, t.staging_ms, t.model_ms, t.other_ms)
    token_layers = tuple(TokenLayerSelection(x.layer, x.tokens, x.shared, x.similarity, x.threshold, x.blocks)
                         for x in r.token_layers)
    periods = tuple(PeriodSelection(p.period, p.first_layer, p.num_layers, tuple(p.chunks), p.predicted,
                                    p.predicted_hits, p.recall, p.mass_recall) for p in r.periods)
    return ReprefillResult(r.token_id, r.text, r.policy, r.budget, timings, r.bytes_fetched, r.prefix_tokens,
                           r.query_tokens, tuple(r.generated_ids), r.generated_text, r.chunks_loaded, r.num_chunks,
                           tuple(r.logits), periods, r.prediction_hit_rate, r.recall, r.bytes_identification,
                           r.bytes_kv, r.bytes_wasted, r.bytes_selected, r.read_amplification, token_layers,
                           r.mass_recall, r.bytes_identification_cached, r.answer_text, r.bytes_fetched_shm)


def token(r: compute_pb2.GenerateResponse) -> GeneratedToken:
    return GeneratedToken(r.index, r.token_id, r.text)


def model_info(r: compute_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(r.name, r.fingerprint, r.num_layers, r.num_kv_heads, r.head_dim, r.num_attention_heads,
                     r.hidden_size, r.vocab_size, r.max_position_embeddings, r.has_tokenizer, r.dtype, r.device,
                     r.chunk_size, tuple(r.policies),
                     tuple(PolicyInfo(p.name, p.layout, p.selective, p.loads_kv, p.default_period)
                           for p in r.policy_info), tuple(r.extra_layouts), r.score_dtype, r.score_heads,
                     r.score_window)
