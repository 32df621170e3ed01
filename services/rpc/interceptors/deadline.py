"""Deadline bookkeeping: the caller's deadline is recorded, and a unary call stops when its budget is spent.

The budget of a unary call is the caller's deadline or ``default_s`` (for callers that set none),
whichever comes first; past it the work is cancelled and the call answers DEADLINE_EXCEEDED, so
abandoned work does not go on using the CPU. Streams (a reviewer's case stream lives for hours) get
only the caller's deadline, which gRPC enforces; their items take their own budget with
:func:`services.rpc.call.request_deadline`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.rpc.call import current_call
from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate


def _record(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    call = current_call()
    if call is not None:
        call.caller_deadline = deadline
    return deadline


class DeadlineInterceptor(RpcInterceptor):
    def __init__(self, default_s: float | None) -> None:
        super().__init__()
        self.default_s = default_s

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        deadline = _record(context)
        if self.default_s is not None:
            own = time.monotonic() + self.default_s
            deadline = own if deadline is None else min(deadline, own)
        if deadline is None:
            return await behavior(request, context)
        async with asyncio.timeout_at(deadline):  # the loop's clock is time.monotonic()
            return await behavior(request, context)

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        _record(context)
        async for item in iterate(behavior, request, context):
            yield item
