"""Thin gRPC adapter over :class:`ComputeCore`: decode, call, encode, map errors in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import grpc

from contiguouskv.common.access import method_scopes
from contiguouskv.common.security import READ, WRITE
from contiguouskv.common.status import status_details
from contiguouskv.compute_server.core import ComputeCore
from contiguouskv.compute_server.errors import ComputeError
from contiguouskv.compute_server.layouts.tensors import dtype_name
from contiguouskv.compute_server.request import RegisterReport, ReprefillArgs, ReprefillReport
from contiguouskv.compute_server.textstream import TextStream
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc

SERVICE_NAME = compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name
# The token scope each RPC needs (contiguouskv.common.access); every RPC of the service is listed.
METHOD_SCOPES = method_scopes(SERVICE_NAME, {
    "RegisterPrefix": WRITE, "Reprefill": READ, "Generate": READ, "GetModelInfo": READ,
})

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _status(context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Turn the project's errors into the status the caller sees; log the unexpected."""
    try:
        yield
    except ComputeError as err:
        raise _Abort(getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL), str(err)) from err
    except ValueError as err:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _guard(context: grpc.aio.ServicerContext, coro: "asyncio.Future[object] | object") -> object:
    try:
        with _status(context):
            return await coro  # type: ignore[misc]
    except _Abort as abort:
        await context.abort(abort.code, status_details(abort.message))
    except Exception:
        log.exception("request failed")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the compute server's log)")
    raise AssertionError("unreachable")


def _args(request: compute_pb2.ReprefillRequest) -> ReprefillArgs:
    which = request.WhichOneof("query")
    query: str | list[int] = list(request.token_ids.ids) if which == "token_ids" else request.text
    return ReprefillArgs(
        prefix_id=request.prefix_id, query=query, policy=request.policy,
        budget=request.budget if request.HasField("budget") else None,
        max_new_tokens=request.max_new_tokens,
        period=request.period if request.HasField("period") else None,
        sub_period=request.sub_period if request.HasField("sub_period") else None,
        return_logits=request.return_logits, evaluate_recall=request.evaluate_recall,
        measure_floor=request.measure_floor)


def _reply(result: ReprefillReport, with_logits: bool = False) -> compute_pb2.ReprefillResponse:
    o, u = result.outcome, result.usage
    layers = [compute_pb2.LayerTiming(layer=t.layer, wait_ms=t.wait_s * 1e3, compute_ms=t.compute_s * 1e3,
                                      bytes=u.layer_bytes[t.layer] if u.layer_bytes else 0,
                                      bytes_identification=u.layer_identification[t.layer] if u.layer_identification else 0,
                                      bytes_selected=u.layer_selected[t.layer] if u.layer_selected else 0,
                                      ident_wait_ms=u.layer_ident_wait[t.layer] * 1e3 if u.layer_ident_wait else 0.0)
              for t in o.layers]
    token_layers = [compute_pb2.TokenLayerSelection(layer=s.layer, tokens=s.tokens.shape[1], shared=s.shared,
                                                    similarity=s.similarity, threshold=s.threshold,
                                                    blocks=len(s.blocks)) for s in u.token_layers]
    periods = [compute_pb2.PeriodSelection(period=p.period, first_layer=p.first_layer, num_layers=p.num_layers,
                                           chunks=p.chunks, predicted=p.predicted, predicted_hits=p.predicted_hits,
                                           recall=p.recall, mass_recall=p.mass_recall) for p in u.periods]
    ident_wait = sum(u.layer_ident_wait) if u.layer_ident_wait else 0.0
    resident, overhead = -1.0, -1.0
    if result.resident_s is not None:
        resident = result.resident_s * 1e3
        overhead = (result.ttft_s - o.wait_s - result.resident_s) * 1e3
    timings = compute_pb2.Timings(ttft_ms=result.ttft_s * 1e3, fetch_wait_ms=o.wait_s * 1e3,
                                  compute_ms=o.compute_s * 1e3, fetch_ms=result.fetch_s * 1e3,
                                  total_ms=(result.ttft_s + o.decode_s) * 1e3, layers=layers,
                                  record_wait_ms=(o.wait_s - ident_wait) * 1e3, ident_wait_ms=ident_wait * 1e3,
                                  resident_compute_ms=resident, overhead_ms=overhead,
                                  selection_ms=o.selection_s * 1e3, staging_ms=o.staging_s * 1e3,
                                  model_ms=o.model_s * 1e3,
                                  other_ms=(result.ttft_s - o.wait_s - o.selection_s - o.staging_s - o.model_s) * 1e3)
    return compute_pb2.ReprefillResponse(
        token_id=result.token_id, text=result.text, policy=result.policy, budget=result.budget,
        timings=timings, bytes_fetched=result.bytes_fetched, prefix_tokens=result.prefix_tokens,
        query_tokens=result.query_tokens, generated_ids=o.generated_ids, generated_text=result.generated_text,
        answer_text=result.answer_text, bytes_fetched_shm=result.bytes_fetched_shm,
        chunks_loaded=round(sum(u.layer_chunks) / max(1, len(u.layer_chunks))), num_chunks=result.num_chunks,
        logits=o.logits.tolist() if with_logits and o.logits is not None else [],
        periods=periods, prediction_hit_rate=u.prediction_hit_rate, recall=u.recall,
        bytes_identification=u.bytes_identification, bytes_kv=u.bytes_kv, bytes_wasted=u.bytes_wasted,
        bytes_selected=u.bytes_selected, read_amplification=u.read_amplification, token_layers=token_layers,
        mass_recall=u.mass_recall, bytes_identification_cached=u.bytes_identification_cached)


class ComputeServicer(compute_pb2_grpc.ComputeServiceServicer):
    """ComputeService over a :class:`ComputeCore`."""

    def __init__(self, core: ComputeCore, device: str) -> None:
        self._core = core
        self._device = device

    async def RegisterPrefix(self, request: compute_pb2.RegisterPrefixRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> compute_pb2.RegisterPrefixResponse:
        which = request.WhichOneof("prefix")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prefix: give text or token_ids")
        prefix: str | list[int] = request.text if which == "text" else list(request.token_ids.ids)
        r = await _guard(context, self._core.register(prefix, list(request.extra_layouts)))
        assert isinstance(r, RegisterReport)
        return compute_pb2.RegisterPrefixResponse(
            prefix_id=r.prefix_id, num_tokens=r.num_tokens, num_chunks=r.num_chunks, chunk_size=r.chunk_size,
            already_registered=r.already_registered, bytes_stored=r.bytes_stored,
            prefill_ms=r.prefill_s * 1e3, store_ms=r.store_s * 1e3)

    async def Reprefill(self, request: compute_pb2.ReprefillRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> compute_pb2.ReprefillResponse:
        result = await _guard(context, self._core.reprefill(_args(request)))
        assert isinstance(result, ReprefillReport)
        return _reply(result, request.return_logits)

    async def Generate(self, request: compute_pb2.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[compute_pb2.GenerateResponse]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def on_token(index: int, token: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, token))

        task = asyncio.ensure_future(_guard(context, self._core.reprefill(_args(request.request), on_token)))
        sent = 0  # token messages so far
        text = TextStream(self._core.decode)
        getter: asyncio.Future[tuple[int, int]] | None = None
        try:
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                index, token = getter.result()
                sent += 1
                yield compute_pb2.GenerateResponse(index=index, token_id=token, text=text.push(token))
            result = await task
        finally:  # a cancelled call leaves neither the request nor a pending queue read behind
            task.cancel()
            if getter is not None:
                getter.cancel()
        assert isinstance(result, ReprefillReport)
        yield compute_pb2.GenerateResponse(index=sent, summary=_reply(result))

    async def GetModelInfo(self, request: compute_pb2.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> compute_pb2.GetModelInfoResponse:
        m = self._core.model
        return compute_pb2.GetModelInfoResponse(
            name=m.name, fingerprint=m.fingerprint, num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, num_attention_heads=m.num_attention_heads, hidden_size=m.hidden_size,
            vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
            has_tokenizer=m.tokenizer is not None, dtype=self._core.kv_dtype, device=self._device,
            chunk_size=self._core.config.chunk_size, policies=list(self._core.policies.names),
            policy_info=[compute_pb2.PolicyInfo(name=cls.name, layout=cls.layout, selective=cls.selective,
                                                loads_kv=cls.loads_kv, default_period=self._core.default_period(cls))
                         for cls in self._core.policies.classes()],
            extra_layouts=self._core.extra_layouts(), score_dtype=dtype_name(self._core.score_dtype),
            score_heads=self._core.config.score_heads, score_window=self._core.config.score_window)
