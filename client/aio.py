"""Asyncio client of a compute server (same surface as :class:`ContiguousKVClient`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc

from contiguouskv.client import _wire
from contiguouskv.client.types import GeneratedToken, ModelInfo, RegisteredPrefix, ReprefillResult
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc


class AsyncContiguousKVClient:
    """Async client; use ``async with`` or ``await close()``."""

    def __init__(self, address: str, *, timeout: float = 300.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address, options=_wire.CHANNEL_OPTIONS)
        self._stub = compute_pb2_grpc.ComputeServiceStub(self._channel)

    async def __aenter__(self) -> "AsyncContiguousKVClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def register(self, text: str | None = None, *, token_ids: Sequence[int] | None = None,
                       extra_layouts: Sequence[str] = (), timeout: float | None = None) -> RegisteredPrefix:
        request = _wire.register_request(text, token_ids, extra_layouts)
        try:
            return _wire.registered(await self._stub.RegisterPrefix(request, timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None

    async def reprefill(self, prefix_id: str, query: str | Sequence[int], *, policy: str = "full",
                        budget: float | None = None, max_new_tokens: int = 0, period: int | None = None,
                        sub_period: int | None = None, return_logits: bool = False, evaluate_recall: bool = False,
                  timeout: float | None = None) -> ReprefillResult:
        request = _wire.reprefill_request(prefix_id, query, policy, budget, max_new_tokens, period, sub_period,
                                          return_logits, evaluate_recall)
        try:
            return _wire.result(await self._stub.Reprefill(request, timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None

    async def generate(self, prefix_id: str, query: str | Sequence[int], *, max_new_tokens: int = 32,
                       policy: str = "full", budget: float | None = None,
                       timeout: float | None = None) -> AsyncIterator[GeneratedToken]:
        request = compute_pb2.GenerateRequest(request=_wire.reprefill_request(
            prefix_id, query, policy, budget, max_new_tokens, None, None))
        try:
            async for message in self._stub.Generate(request, timeout=timeout or self.timeout):
                if not message.HasField("summary"):
                    yield _wire.token(message)
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        try:
            return _wire.model_info(await self._stub.GetModelInfo(compute_pb2.GetModelInfoRequest(),
                                                                  timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise _wire.to_error(err, self.address) from None
