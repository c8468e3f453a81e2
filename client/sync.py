"""Blocking client of a compute server."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

import grpc

from contiguouskv.client import _wire
from contiguouskv.client.types import GeneratedToken, ModelInfo, RegisteredPrefix, ReprefillResult
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc


class ContiguousKVClient:
    """Talks to one compute server at ``address`` (HOST:PORT); every call has a timeout.

    Use as a context manager or call :meth:`close`. Errors are :class:`ContiguousKVError` subclasses.
    """

    def __init__(self, address: str, *, timeout: float = 300.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=_wire.CHANNEL_OPTIONS)
        self._stub = compute_pb2_grpc.ComputeServiceStub(self._channel)

    def __enter__(self) -> "ContiguousKVClient":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def register(self, text: str | None = None, *, token_ids: Sequence[int] | None = None,
                 extra_layouts: Sequence[str] = (), timeout: float | None = None) -> RegisteredPrefix:
        """Prefill and store a prefix given as text or token ids; returns its id.

        ``extra_layouts``: layouts to store besides `contiguous`; ``["impress"]`` is what the `h2o`
        and `impress` policies read. Registering again with a new layout adds just that layout.
        """
        request = _wire.register_request(text, token_ids, extra_layouts)
        try:
            return _wire.registered(self._stub.RegisterPrefix(request, timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None

    def reprefill(self, prefix_id: str, query: str | Sequence[int], *, policy: str = "full",
                  budget: float | None = None, max_new_tokens: int = 0, period: int | None = None,
                  sub_period: int | None = None, return_logits: bool = False, evaluate_recall: bool = False,
                  timeout: float | None = None) -> ReprefillResult:
        """First token of prefix + query (text or token ids) under a loading policy.

        ``policy``: recompute | full | contiguous | contiguous+ | h2o | impress (the last two need a
        prefix registered with ``extra_layouts=["impress"]``); ``budget``: fraction of the prefix kept
        (chunks, or tokens for h2o/impress); ``period``/``sub_period``: layers per selection and per
        fetch run (contiguous policies).
        """
        request = _wire.reprefill_request(prefix_id, query, policy, budget, max_new_tokens, period, sub_period,
                                          return_logits, evaluate_recall)
        try:
            return _wire.result(self._stub.Reprefill(request, timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None

    def generate(self, prefix_id: str, query: str | Sequence[int], *, max_new_tokens: int = 32,
                 policy: str = "full", budget: float | None = None,
                 timeout: float | None = None) -> Iterator[GeneratedToken]:
        """Stream tokens as they are computed: the first token, then up to ``max_new_tokens`` more."""
        request = compute_pb2.GenerateRequest(request=_wire.reprefill_request(
            prefix_id, query, policy, budget, max_new_tokens, None, None))
        try:
            for message in self._stub.Generate(request, timeout=timeout or self.timeout):
                if not message.HasField("summary"):
                    yield _wire.token(message)
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        try:
            return _wire.model_info(self._stub.GetModelInfo(compute_pb2.GetModelInfoRequest(),
                                                            timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None
