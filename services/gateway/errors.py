"""The one place where exceptions become gRPC status codes; messages carry no patient data, never UNKNOWN."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from medgate.v1 import inference_pb2 as inference_pb
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

# A caller's own id (a PACS accession workflow id, a load-test id) is echoed back and logged;
# anything else gets a fresh one. Both travel as trailing metadata of every answer.
REQUEST_ID_KEY = "x-request-id"
_CALLER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_STAGES = ("decode_ms", "preprocess_ms", "triton_ms", "encode_ms")


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` if it is a plain token (never free text), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CALLER_ID.match(value):
            return value
    return uuid.uuid4().hex[:16]


def _access_log(rpc: str, code: str, request_id: str, started: float, message: str = "", response: Any = None) -> None:
    """One line per call: identifiers, status and timings only."""
    REQUESTS.labels(rpc=rpc, code=code).inc()
    fields: dict[str, Any] = {
        "event": "rpc",
        "rpc": rpc,
        "code": code,
        "request_id": request_id,
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 2),
    }
    timings = getattr(response, "timings", None)
    if timings is not None:
        for stage in _STAGES:
            fields[stage] = round(float(getattr(timings, stage, 0.0)), 2)
    text = f"{rpc} {code} {fields['duration_ms']:.1f} ms request_id={request_id}"
    if message:
        fields["error"] = message
        text += f": {message}"
    log.info(text, extra=fields)


def unary_boundary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[ResponseT]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[ResponseT]]:
    """Wrap a unary servicer method so every failure ends as one proper status (the server keeps serving)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> ResponseT:
        started = time.perf_counter()
        request_id = request_id_of(context)
        trailer = ((REQUEST_ID_KEY, request_id),)
        try:
            response = await method(self, request, context)
        except asyncio.CancelledError:
            _access_log(method.__name__, "CANCELLED", request_id, started)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            _access_log(method.__name__, code.name, request_id, started, message)
            await context.abort(code, message, trailing_metadata=trailer)
            raise AssertionError("unreachable: context.abort raises") from None
        context.set_trailing_metadata(trailer)
        _access_log(method.__name__, "OK", request_id, started, response=response)
        return response

    return wrapper


AnswerT = TypeVar("AnswerT")


async def answer_item(answer: AnswerT, work: Awaitable[Any], rpc: str) -> AnswerT:
    """One item of a batch stream: ``answer.response`` from ``work``, or ``answer.error`` with its code.

    The same mapping as a unary call, but a failed item becomes an answer and the stream goes on.
    """
    try:
        answer.response.CopyFrom(await work)  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        code, message = status_for(exc)
        answer.error.CopyFrom(  # type: ignore[attr-defined]
            inference_pb.ItemError(code=code.value[0], code_name=code.name, message=message)
        )
    REQUESTS.labels(rpc=f"{rpc}.item", code=answer.error.code_name or "OK").inc()  # type: ignore[attr-defined]
    return answer


def stream_boundary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[ResponseT]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[ResponseT]]:
    """Wrap a streaming servicer method: a failure of the stream itself ends it with one proper status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[ResponseT]:
        started = time.perf_counter()
        request_id = request_id_of(context)
        trailer = ((REQUEST_ID_KEY, request_id),)
        try:
            async for item in method(self, request, context):
                yield item
        except asyncio.CancelledError:
            _access_log(method.__name__, "CANCELLED", request_id, started)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            _access_log(method.__name__, code.name, request_id, started, message)
            await context.abort(code, message, trailing_metadata=trailer)
        else:
            context.set_trailing_metadata(trailer)
            _access_log(method.__name__, "OK", request_id, started)

    return wrapper
