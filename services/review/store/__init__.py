"""The review store: human loops, leased deliveries and idempotent decisions, one interface for its backends."""

# model: records, statuses and errors; keys: digests, loop names and page tokens every backend computes alike;
# base: the interface, its semantics, argument checks and work events; sql: the statements both backends run
# alike; sqlite (with schema): the embedded backend; postgres (with postgres_schema): the one replicas share;
# waiters: who to wake for a work event.

from __future__ import annotations

from typing import TYPE_CHECKING

from services.review.flows import ReviewError
from services.review.store.base import ReviewStoreBase
from services.review.store.keys import auto_loop_name
from services.review.store.model import (
    ACTIVATION_REASONS_KEY,
    DICOM_CONTEXT_NAME,
    DICOM_PENDING,
    DICOM_SOURCE_NAME,
    FAILURE_EXPIRED,
    MAX_ID_CHARS,
    MAX_LIST_RESULTS,
    MAX_REVIEWER_CHARS,
    AlreadyExists,
    Decision,
    Delivery,
    ExpiryReport,
    InvalidState,
    LeaseBatch,
    Loop,
    LoopStatus,
    NotFound,
    NotYourLease,
    StoreUnavailable,
    WorkEvent,
)
from services.review.store.schema import SCHEMA_VERSION
from services.review.store.sqlite import ReviewStore

if TYPE_CHECKING:
    from services.settings import ReviewSettings

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(settings: ReviewSettings, *, owner: bool = True) -> ReviewStoreBase:
    """The store ``settings`` name: PostgreSQL at ``store_url`` when it is set, else SQLite at ``store_path``.

    Either way its schema is brought to :data:`SCHEMA_VERSION` first. ``owner=False`` opens it beside a
    running review service (exports, reports): SQLite then leaves the leases alone, and PostgreSQL does
    not listen for other replicas' work.
    """
    if settings.store_url:
        if not settings.store_url.startswith(POSTGRES_SCHEMES):
            raise ReviewError("review.store_url must be a postgresql:// URL (empty for SQLite at store_path)")
        from services.review.store.postgres import PostgresReviewStore  # psycopg only when it is used

        # The server's store threads plus its housekeeping and the occasional second caller.
        return PostgresReviewStore(settings.store_url, pool_size=settings.threads + 2, listen=owner)
    settings.store_path.parent.mkdir(parents=True, exist_ok=True)
    return ReviewStore(settings.store_path, busy_timeout_s=settings.store_busy_timeout_s, owner=owner)


__all__ = [
    "ACTIVATION_REASONS_KEY",
    "DICOM_CONTEXT_NAME",
    "DICOM_PENDING",
    "DICOM_SOURCE_NAME",
    "FAILURE_EXPIRED",
    "MAX_ID_CHARS",
    "MAX_LIST_RESULTS",
    "MAX_REVIEWER_CHARS",
    "SCHEMA_VERSION",
    "AlreadyExists",
    "Decision",
    "Delivery",
    "ExpiryReport",
    "InvalidState",
    "LeaseBatch",
    "Loop",
    "LoopStatus",
    "NotFound",
    "NotYourLease",
    "ReviewStore",
    "ReviewStoreBase",
    "StoreUnavailable",
    "WorkEvent",
    "auto_loop_name",
    "open_store",
]
