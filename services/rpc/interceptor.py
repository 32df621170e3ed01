"""A base that lets one interceptor be one small class: override ``unary`` and/or ``stream``.

gRPC's asyncio interceptors get a method *handler* and must return one; wrapping each of its four
kinds by hand is the same twenty lines every time. Here ``unary`` wraps the calls that answer once
(unary-unary, stream-unary) and ``stream`` those that answer with a stream (unary-stream,
stream-stream). Interceptors listed first run outermost. gRPC tells a streaming handler by its
function (an ``async def`` generator), so the wrappers below are generator functions themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], Any]


async def iterate(behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Answers of a streaming behaviour, whether it yields them or writes them with ``context.write``."""
    result = behavior(request, context)
    if inspect.isawaitable(result):  # e.g. the health service's Watch: a coroutine that writes
        await result
        return
    async for item in result:
        yield item


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method of every service on the server; the defaults pass calls through unchanged.

    gRPC asks for the handler on every call; the wrapped handler is built once per method and
    reused (the wrappers keep no per-call state), which halves what the chain costs a call.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def skip(self, full_method: str) -> bool:
        """True to leave this method alone (e.g. health checks for the access log)."""
        return False

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        return await behavior(request, context)

    def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        return iterate(behavior, request, context)

    def deserializer(self, full_method: str, deserialize: Callable[[bytes], Any] | None) -> Any:
        """The request deserializer to use (validation swaps in a tolerant one)."""
        return deserialize

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or self.skip(method):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = self.deserializer(method, handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.unary(method, inner_uu, request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.unary(method, inner_su, requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in self.stream(method, inner_us, request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in self.stream(method, inner_ss, requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
