"""Opens the call record and gives every call a request id: the caller's if it is a plain token, else a new one.

The id travels back as trailing metadata of every answer, failed or not, and is in every access-log
line, so a PACS integrator can quote it. A free-text id (it could carry a patient's name) is replaced.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.rpc.call import REQUEST_ID_KEY, Call, begin, transport_peer
from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate

_CALLER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` if it is a plain token (never free text), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CALLER_ID.match(value):
            return value
    return uuid.uuid4().hex[:16]


class RequestIdInterceptor(RpcInterceptor):
    def _open(self, full_method: str, context: grpc.aio.ServicerContext) -> Call:
        call = begin(full_method)
        call.request_id = request_id_of(context)
        call.peer = transport_peer(context)
        context.set_trailing_metadata(call.trailer)
        return call

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        self._open(full_method, context)
        return await behavior(request, context)

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        self._open(full_method, context)
        async for item in iterate(behavior, request, context):
            yield item
