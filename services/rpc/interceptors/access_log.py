"""One access-log line and one request count per call: identifiers, status and timings, never payloads.

Health checks and reflection are not logged (a load balancer probes every few seconds); they are
still counted in ``medgate_requests_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from services.metrics import REQUESTS
from services.rpc.call import Call, current_call, split_method
from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate

QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})
_STAGES = ("decode_ms", "preprocess_ms", "triton_ms", "encode_ms", "dicom_ms", "route_ms")
# The server learns the caller's deadline when the headers arrive, so its copy runs a little late: the
# caller's own cancellation at its deadline can reach us first. A cancel this close to the deadline is it.
_DEADLINE_SLACK_S = 0.1


def _ended(call: Call | None, full_method: str, exc: BaseException | None) -> Call:
    """The call record with its final code (a cancelled call past its deadline is DEADLINE_EXCEEDED)."""
    if call is None:  # no request-id interceptor in front of us: still log
        service, method = split_method(full_method)
        call = Call(service=service, method=method)
    if isinstance(exc, asyncio.CancelledError):
        late = call.caller_deadline is not None and time.monotonic() >= call.caller_deadline - _DEADLINE_SLACK_S
        call.code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
    elif exc is not None and call.code is grpc.StatusCode.OK:
        call.code = grpc.StatusCode.INTERNAL  # an exception no status interceptor mapped
    return call


class AccessLogInterceptor(RpcInterceptor):
    def __init__(self, logger: str) -> None:
        super().__init__()
        self.log = logging.getLogger(logger)

    def _write(self, call: Call) -> None:
        code = call.code.name
        REQUESTS.labels(rpc=call.method, code=code).inc()
        if call.service in QUIET_SERVICES:
            return
        elapsed = round(call.elapsed_ms, 2)
        fields: dict[str, Any] = {
            "event": "rpc",
            "service": call.service,
            "rpc": call.method,
            "code": code,
            "request_id": call.request_id,
            "duration_ms": elapsed,
        }
        timings = getattr(call.response, "timings", None)
        if timings is not None:
            for stage in _STAGES:
                if hasattr(timings, stage):
                    fields[stage] = round(float(getattr(timings, stage)), 2)
        text = f"{call.method} {code} {elapsed:.1f} ms request_id={call.request_id}"
        if call.message:
            fields["error"] = call.message
            text += f": {call.message}"
        self.log.info(text, extra=fields)

    @contextlib.contextmanager
    def _logged(self, full_method: str) -> Iterator[None]:
        """Write the line when the call ends, however it ends."""
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._write(_ended(current_call(), full_method, failure))

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        with self._logged(full_method):
            response = await behavior(request, context)
            call = current_call()
            if call is not None:
                call.response = response
            return response

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        with self._logged(full_method):
            async for item in iterate(behavior, request, context):
                yield item
