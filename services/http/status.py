"""gRPC status codes as HTTP statuses, and the JSON error body every refusal of the HTTP face has.

The code comes from the gateway's one status table (services/rpc/status.py); this only says which
HTTP status carries it. The message is the gateway's caller-safe one (it names the field, never the
caller's text; INTERNAL carries the incident id to quote).
"""

from __future__ import annotations

from typing import Any

import grpc

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    # A limit of the request (too many prompts, an image over the message limit): the caller must send less.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    # The input is well formed but cannot be processed here (an unsupported codec): 422, as RFC 9110 reads it.
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    # The caller went away; nobody reads this answer, but the access log of the HTTP side should say so (nginx's 499).
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# gRPC's own answer when a worker already has gateway.max_concurrent_rpcs in flight: an overload to retry
# shortly, not a request that is too large.
_OVERLOADED = "concurrent rpc limit exceeded"


class HttpError(Exception):
    """A refusal of the HTTP face: its HTTP status, the gRPC code name it stands for, a caller-safe message."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, rpc: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        # True: the gateway's gRPC chain gave this answer (and logged, counted and audited the call).
        self.rpc = rpc

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, details: str, *, where: str = "") -> HttpError:
        """The HTTP form of a gRPC failure; ``where`` prefixes the message (``input_data.data[2]: ...``)."""
        message = f"{where}: {details}" if where else details
        headers: dict[str, str] = {}
        status = HTTP_STATUS.get(code, 500)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.lower().startswith(_OVERLOADED):
            status, headers = 503, {"Retry-After": "1"}
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            headers = {"WWW-Authenticate": 'Bearer realm="medgate"'}
        elif code is grpc.StatusCode.UNAVAILABLE:
            headers = {"Retry-After": "1"}
        return cls(status, code.name, message, headers=headers, rpc=True)

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": {"code": self.status, "status": self.code, "message": self.message, "request_id": request_id}}


def bad_request(message: str) -> HttpError:
    return HttpError(400, grpc.StatusCode.INVALID_ARGUMENT.name, message)


def too_large(message: str) -> HttpError:
    return HttpError(413, grpc.StatusCode.RESOURCE_EXHAUSTED.name, message)
