"""The single status table: every domain error has exactly one gRPC code; anything else is a bug (INTERNAL).

Messages of domain errors are written to be safe (technical facts only: field names, sizes, limits),
so they reach the caller as they are. Any other exception is logged with its traceback but without its
message (which could quote a header value), and the caller gets INTERNAL with an incident id to quote.
Never UNKNOWN.
"""

from __future__ import annotations

import logging
import traceback
import uuid

import grpc

from services.imaging.errors import InvalidImage, LimitExceeded, UnsupportedCodec
from services.imaging.ingest.reference import ReferenceNotFound, ReferenceUnavailable
from services.report.limits import FindingsTooLong, InvalidFindings
from services.review.flows import InvalidArgument as ReviewInvalidArgument
from services.review.store import AlreadyExists, InvalidState, NotFound, NotYourLease, StoreUnavailable
from services.rpc.errors import BadRequest, RequestTooLarge
from services.security.errors import PermissionDenied, Unauthenticated
from services.triton.client import ModelFailed, RoleNotServed, TritonDeadline, TritonRejected, TritonUnavailable

log = logging.getLogger("medgate.rpc")

# Order matters only for subclasses.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotYourLease, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidImage, grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ReviewInvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidFindings, grpc.StatusCode.INVALID_ARGUMENT),
    (TritonRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ReferenceNotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidState, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedCodec, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FindingsTooLong, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RoleNotServed, grpc.StatusCode.UNIMPLEMENTED),
    (TritonUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ReferenceUnavailable, grpc.StatusCode.UNAVAILABLE),
    (TritonDeadline, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelFailed, grpc.StatusCode.INTERNAL),
)

_WITHOUT_MESSAGE = {grpc.StatusCode.DEADLINE_EXCEEDED: "the deadline passed before the answer was ready"}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-safe message for an exception raised while serving a request."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # a task group's first failure is the one the caller should see
    for exc_type, code in STATUS_TABLE:
        if isinstance(exc, exc_type):
            return code, str(exc) or _WITHOUT_MESSAGE.get(code, exc_type.__name__)
    incident = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("internal error %s: %s\n%s", incident, type(exc).__name__, frames)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"
