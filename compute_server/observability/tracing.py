"""Spans of a Re-Prefill on the compute server: ``run reprefill`` and one ``run layer`` per layer.

:func:`traced_reprefill` wraps :meth:`ComputeCore.reprefill`: the ``run reprefill`` span is current
while the request runs, so the cache RPCs it makes (manifest, Fetch) are its children. The layers
run on the compute thread; their spans are recorded afterwards from the timings the engine measured
(``QueryOutcome.layers``), with the layers' real start and end times. One log line per request
carries the trace id (``--log-format json``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from contiguouskv.common import telemetry as t
from contiguouskv.compute_server.request import ReprefillArgs, ReprefillReport

log = logging.getLogger(__name__)
tracer = t.Tracer("contiguouskv.compute")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def traced_reprefill(method: F) -> F:
    """Decorate ``ComputeCore.reprefill(self, args, ...)`` with its spans and its log line."""

    @functools.wraps(method)
    async def wrapper(self: object, args: ReprefillArgs, *rest: object, **kwargs: object) -> ReprefillReport:
        attributes: dict[str, str | float] = {t.ATTR_PREFIX_ID: args.prefix_id}
        if args.policy:
            attributes[t.ATTR_POLICY] = args.policy
        if args.budget is not None:
            attributes[t.ATTR_BUDGET] = args.budget
        with tracer.span(t.SPAN_RUN_REPREFILL, attributes) as span:
            result: ReprefillReport = await method(self, args, *rest, **kwargs)
            span.set_attribute(t.ATTR_POLICY, result.policy)  # resolved: the server's default when unnamed
            span.set_attribute(t.ATTR_TTFT_MS, result.ttft_s * 1e3)
            span.set_attribute(t.ATTR_BYTES, result.bytes_fetched)
            span.set_attribute(t.ATTR_PREFIX_TOKENS, result.prefix_tokens)
            span.set_attribute(t.ATTR_QUERY_TOKENS, result.query_tokens)
            span.set_attribute(t.ATTR_WAIT_MS, result.outcome.wait_s * 1e3)
            span.set_attribute(t.ATTR_SELECTION_MS, result.outcome.selection_s * 1e3)
            span.set_attribute(t.ATTR_STAGING_MS, result.outcome.staging_s * 1e3)
            span.set_attribute(t.ATTR_MODEL_MS, result.outcome.model_s * 1e3)
            if result.resident_s is not None:  # where the time went (docs/observability.md)
                span.set_attribute(t.ATTR_RESIDENT_COMPUTE_MS, result.resident_s * 1e3)
                span.set_attribute(t.ATTR_OVERHEAD_MS, (result.ttft_s - result.outcome.wait_s - result.resident_s) * 1e3)
            record_layers(span, result)
            log.info("reprefill %s policy %s: ttft %.1f ms, %d bytes fetched", args.prefix_id, result.policy,
                     result.ttft_s * 1e3, result.bytes_fetched,
                     extra={"ckv_prefix_id": args.prefix_id, "ckv_policy": result.policy,
                            "ckv_ttft_ms": round(result.ttft_s * 1e3, 3), "ckv_bytes": result.bytes_fetched})
            return result

    return wrapper  # type: ignore[return-value]


def _period_of(result: ReprefillReport) -> dict[int, int]:
    """Layer -> the period (of a periodic policy) it belongs to."""
    return {layer: p.period for p in result.usage.periods
            for layer in range(p.first_layer, p.first_layer + p.num_layers)}


def layer_attributes(result: ReprefillReport) -> list[dict[str, t.AttributeValue]]:
    """Per layer of the outcome: layer, period (when the policy has periods), chunks selected (64-token
    blocks for h2o/impress), io wait (and the part of it spent on identification data) and compute
    ms, K/V bytes read and identification bytes read."""
    usage, periods = result.usage, _period_of(result)
    rows = []
    for timing in result.outcome.layers:
        layer = timing.layer
        row: dict[str, t.AttributeValue] = {
            t.ATTR_LAYER: layer, t.ATTR_IO_WAIT_MS: timing.wait_s * 1e3, t.ATTR_COMPUTE_MS: timing.compute_s * 1e3,
            t.ATTR_CHUNKS_SELECTED: usage.layer_chunks[layer] if layer < len(usage.layer_chunks) else 0,
            t.ATTR_BYTES: usage.layer_bytes[layer] if layer < len(usage.layer_bytes) else 0,
            t.ATTR_BYTES_IDENTIFICATION:
                usage.layer_identification[layer] if layer < len(usage.layer_identification) else 0,
            t.ATTR_IDENT_WAIT_MS:
                usage.layer_ident_wait[layer] * 1e3 if layer < len(usage.layer_ident_wait) else 0.0,
        }
        if layer in periods:
            row[t.ATTR_PERIOD] = periods[layer]
        rows.append(row)
    return rows


def record_layers(parent: t.Span, result: ReprefillReport) -> None:
    """One finished ``run layer`` span per layer, at the times the layer ran."""
    if not parent.is_recording():
        return
    layers = result.outcome.layers
    # perf_counter -> wall-clock ns, both read now
    offset_ns = time.time_ns() - time.perf_counter_ns()
    end_ns = time.time_ns()
    starts = [timing.started_s for timing in layers]
    if not all(starts):  # no start times: lay the layers end to end, ending now
        durations = [int((x.wait_s + x.compute_s) * 1e9) for x in layers]
        starts_ns = [end_ns - sum(durations[i:]) for i in range(len(layers))]
    else:
        starts_ns = [offset_ns + int(s * 1e9) for s in starts]
    for timing, start_ns, attributes in zip(layers, starts_ns, layer_attributes(result)):
        duration_ns = int((timing.wait_s + timing.compute_s) * 1e9)
        tracer.record(t.SPAN_RUN_LAYER, start_ns, start_ns + duration_ns, attributes, parent)
