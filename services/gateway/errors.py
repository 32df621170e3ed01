"""The one place where exceptions become gRPC status codes; messages carry no patient data, never UNKNOWN."""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.imaging.errors import InvalidImage, LimitExceeded, UnsupportedCodec
from services.metrics import REQUESTS
from services.report.limits import FindingsTooLong, InvalidFindings
from services.triton.client import ModelFailed, RoleNotServed, TritonDeadline, TritonRejected, TritonUnavailable

log = logging.getLogger("medgate.gateway")


class BadRequest(ValueError):
    """The request itself is malformed: a missing image, an empty prompt, a box outside the image."""


class RequestTooLarge(ValueError):
    """The request asks for more than a configured limit allows (too many prompts or boxes)."""


# Order matters only for subclasses; every domain error has exactly one code.
_STATUS_BY_TYPE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidImage, grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidFindings, grpc.StatusCode.INVALID_ARGUMENT),
    (TritonRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedCodec, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FindingsTooLong, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RoleNotServed, grpc.StatusCode.UNIMPLEMENTED),
    (TritonUnavailable, grpc.StatusCode.UNAVAILABLE),
    (TritonDeadline, grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelFailed, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-safe message for an exception raised while serving a request.

    Domain errors carry messages written to be safe (technical facts only). Anything else is a bug:
    it is logged with its traceback but without its message (which could quote header values), and
    the caller gets INTERNAL with an incident id to quote.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # a task group's first failure is the one the caller should see
    for exc_type, code in _STATUS_BY_TYPE:
        if isinstance(exc, exc_type):
            return code, str(exc) or exc_type.__name__
    incident = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("internal error %s: %s\n%s", incident, type(exc).__name__, frames)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"


ResponseT = TypeVar("ResponseT")


def unary_boundary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[ResponseT]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[ResponseT]]:
    """Wrap a unary servicer method so every failure ends as one proper status (the server keeps serving)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> ResponseT:
        try:
            response = await method(self, request, context)
        except asyncio.CancelledError:
            REQUESTS.labels(rpc=method.__name__, code="CANCELLED").inc()
            raise
        except Exception as exc:
            code, message = status_for(exc)
            REQUESTS.labels(rpc=method.__name__, code=code.name).inc()
            log.info("%s -> %s: %s", method.__name__, code.name, message)
            await context.abort(code, message)
            raise AssertionError("unreachable: context.abort raises") from None
        REQUESTS.labels(rpc=method.__name__, code="OK").inc()
        return response

    return wrapper


def stream_boundary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[ResponseT]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[ResponseT]]:
    """Wrap a streaming servicer method: a failure of the stream itself ends it with one proper status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[ResponseT]:
        try:
            async for item in method(self, request, context):
                yield item
        except asyncio.CancelledError:
            REQUESTS.labels(rpc=method.__name__, code="CANCELLED").inc()
            raise
        except Exception as exc:
            code, message = status_for(exc)
            REQUESTS.labels(rpc=method.__name__, code=code.name).inc()
            log.info("%s -> %s: %s", method.__name__, code.name, message)
            await context.abort(code, message)
        else:
            REQUESTS.labels(rpc=method.__name__, code="OK").inc()

    return wrapper
