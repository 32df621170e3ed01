"""Domain errors of image ingest; the gRPC layer maps each to one status code in one place."""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error ingest raises; messages never carry patient data.

    Messages name technical facts only (format, transfer syntax, sizes, photometric
    interpretation, limits), so the RPC boundary can return them to the caller as they are.
    """


class InvalidImage(IngestError):
    """The bytes are not a readable image (maps to INVALID_ARGUMENT)."""


class UnsupportedCodec(IngestError):
    """A real but unsupported transfer syntax, codec or format (maps to FAILED_PRECONDITION)."""


class LimitExceeded(IngestError):
    """The input would exceed a configured limit (maps to RESOURCE_EXHAUSTED).

    ``limit`` is the name of the :class:`~services.imaging.limits.IngestLimits` field, so a caller
    knows which setting to raise; ``value`` is ``None`` when the real size is unknown (a bomb
    stopped part way).
    """

    def __init__(self, limit: str, maximum: int, value: int | None = None, *, what: str = "input") -> None:
        if value is None:
            message = f"{what} exceeds {limit} ({maximum:,})"
        else:
            message = f"{what} exceeds {limit}: {value:,} > {maximum:,}"
        super().__init__(message)
        self.limit = limit
        self.maximum = maximum
        self.value = value
