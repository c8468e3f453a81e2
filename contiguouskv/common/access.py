"""Who may call what, and how much at once: the server interceptor in front of both services.

:class:`AccessInterceptor` checks each call of a protected method (one listed in ``scopes``; health
and reflection are open, so probes work without a token) before the servicer sees it:

1. with a :class:`~contiguouskv.common.security.TokenTable`, the call must carry
   ``authorization: Bearer <token>``: none or an unknown token → UNAUTHENTICATED; a token without the
   method's scope (``read`` or ``write``) → PERMISSION_DENIED;
2. with a :class:`ClientLimiter`, a client (``token-name@ip`` when tokens are on, else the peer's IP
   address; so replicas sharing a token have a budget each) may have at most ``limit`` calls of the
   protected methods in flight; one more →
   RESOURCE_EXHAUSTED naming ``max_streams_per_client``.

Refused calls never reach the servicer; the message says what is missing and never echoes a token.
Place it last among a server's interceptors, so metrics and tracing see refused calls with their
status; :attr:`AccessInterceptor.refusals` counts them by status for the metrics endpoint.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from contiguouskv.common.security import Grant, TokenTable, bearer_token

log = logging.getLogger(__name__)

Behavior = Callable[..., Any]


def method_scopes(service_full_name: str, scopes: Mapping[str, str]) -> dict[str, str]:
    """``{"/pkg.Service/Method": scope}`` from ``{"Method": scope}``."""
    return {f"/{service_full_name}/{method}": scope for method, scope in scopes.items()}


def peer_host(peer: str) -> str:
    """The client address of a gRPC peer string without its port: ``ipv4:1.2.3.4:5`` → ``1.2.3.4``."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer


class ClientLimiter:
    """Calls in flight per client, at most ``limit`` each (0 = no limit). Event-loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}

    def try_enter(self, client: str) -> bool:
        """Count one more call of ``client``; ``False`` (and nothing counted) when it is at the limit."""
        count = self._active.get(client, 0)
        if self.limit and count >= self.limit:
            return False
        self._active[client] = count + 1
        return True

    def leave(self, client: str) -> None:
        count = self._active.pop(client) - 1
        if count:
            self._active[client] = count

    def active(self, client: str) -> int:
        return self._active.get(client, 0)


def _handler_with(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A method handler of the same kind as ``handler`` that runs ``behavior``."""
    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                  handler.response_streaming)]
    return kind(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)




class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, scopes and per-client concurrency for the methods in ``scopes``."""

    def __init__(self, scopes: Mapping[str, str], tokens: TokenTable | None,
                 limiter: ClientLimiter | None) -> None:
        self._scopes = dict(scopes)
        self._tokens = tokens
        self._limiter = limiter
        self.refusals: dict[str, int] = {}  # status name -> calls refused since start (metrics)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        scope = self._scopes.get(details.method)
        if handler is None or scope is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        grant: Grant | None = None
        if self._tokens is not None:
            token = bearer_token(details.invocation_metadata)
            if not token:
                return self._refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                                f"{method}: no bearer token (send metadata 'authorization: Bearer <token>')")
            grant = self._tokens.lookup(token)
            if grant is None:
                log.warning("auth: %s refused: unknown bearer token", method)
                return self._refusal(handler, grpc.StatusCode.UNAUTHENTICATED, f"{method}: unknown bearer token")
            if scope not in grant.scopes:
                log.warning("auth: %s refused: token %s lacks scope %s", method, grant.name, scope)
                return self._refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                                f"{method}: token {grant.name!r} lacks the {scope!r} scope")
        if self._limiter is None or not self._limiter.limit:
            return handler
        return _handler_with(handler, self._limited(_behavior_of(handler), handler.response_streaming,
                                                    method, grant.name if grant else None))

    def _count(self, status: str) -> None:
        self.refusals[status] = self.refusals.get(status, 0) + 1

    def _refusal(self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                 message: str) -> grpc.RpcMethodHandler:
        self._count(code.name)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        return _handler_with(handler, refuse)

    def _limited(self, behavior: Behavior, streaming: bool, method: str, name: str | None) -> Behavior:
        limiter = self._limiter
        assert limiter is not None

        async def enter(context: grpc.aio.ServicerContext) -> str:
            host = peer_host(context.peer())
            client = f"{name}@{host}" if name else host
            if not limiter.try_enter(client):
                self._count("RESOURCE_EXHAUSTED")
                log.warning("limit: %s refused: client %s has %d calls in flight", method, client, limiter.limit)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{method}: max_streams_per_client ({limiter.limit}) calls already in "
                                    f"flight for client {client}")
            return client

        if streaming and inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                client = await enter(context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    limiter.leave(client)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            client = await enter(context)
            try:
                return await behavior(request, context)
            finally:
                limiter.leave(client)

        return call


def access_interceptor(scopes: Mapping[str, str], tokens_file: Path | None,
                       max_streams_per_client: int) -> AccessInterceptor | None:
    """The interceptor a server's config asks for, or ``None`` when tokens and the limit are off."""
    if tokens_file is None and not max_streams_per_client:
        return None
    tokens = TokenTable(tokens_file) if tokens_file is not None else None
    return AccessInterceptor(scopes, tokens, ClientLimiter(max_streams_per_client))
