"""Requests are checked before a servicer sees them: parse failures, unknown enum values, NaN and infinity.

A request that does not parse (a prompt that is not UTF-8) would otherwise end as UNKNOWN
("Unexpected DecodeError") before any of our code runs; here the deserializer keeps the failure and
the call answers INVALID_ARGUMENT naming the field. Streamed requests are checked item by item by
:func:`services.rpc.streams.answer_item`, so one bad item fails that item, not the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate
from services.rpc.validation import Undecodable, check_message, decode_or_explain


def check_request(request: Any) -> None:
    """Raise BadRequest for a request that did not parse or has a meaningless field."""
    if isinstance(request, Undecodable):
        raise request.error()
    if isinstance(request, Message):
        check_message(request)


class ValidationInterceptor(RpcInterceptor):
    def deserializer(self, full_method: str, deserialize: Callable[[bytes], Any] | None) -> Any:
        descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        if deserialize is None or descriptor is None:
            return deserialize  # not a generated message's FromString: leave it be

        def tolerant(data: bytes) -> Any:
            return decode_or_explain(descriptor, data, deserialize)

        return tolerant

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        if not hasattr(request, "__aiter__"):
            check_request(request)
        return await behavior(request, context)

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if not hasattr(request, "__aiter__"):
            check_request(request)
        async for item in iterate(behavior, request, context):
            yield item
