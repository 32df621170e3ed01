"""The error boundary: any exception a servicer raises ends the call with its one status from the table.

The server keeps serving; the caller gets a code and a message without patient data (see
:mod:`services.rpc.status`); a bug is INTERNAL with an incident id that is also in the log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from services.rpc.call import current_call
from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate
from services.rpc.status import status_for


async def _abort(exc: Exception, context: grpc.aio.ServicerContext) -> NoReturn:
    code, message = status_for(exc)
    call = current_call()
    trailer: tuple[tuple[str, str], ...] = ()
    if call is not None:
        call.code, call.message = code, message
        trailer = call.trailer
    await context.abort(code, message, trailing_metadata=trailer)
    raise AssertionError("unreachable: context.abort raises")


def _aborted_already(context: grpc.aio.ServicerContext) -> None:
    """A servicer (or grpc itself) that aborted: keep its code for the access log."""
    call = current_call()
    code = context.code()
    if call is not None and isinstance(code, grpc.StatusCode):
        call.code = code
        call.message = str(context.details() or "")


class StatusInterceptor(RpcInterceptor):
    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            _aborted_already(context)
            raise
        except Exception as exc:
            await _abort(exc, context)

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for item in iterate(behavior, request, context):
                yield item
        except grpc.aio.AbortError:
            _aborted_already(context)
            raise
        except Exception as exc:
            await _abort(exc, context)
