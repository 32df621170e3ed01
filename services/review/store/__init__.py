"""The review store: human loops, leased deliveries and idempotent decisions, one interface for its backends."""

# model: records, statuses and errors; keys: digests, loop names and page tokens every backend computes alike;
# base: the shared semantics and waiting for work; sqlite (with schema): the embedded backend. A PostgreSQL
# backend goes beside sqlite as another ReviewStoreBase.

from services.review.store.base import ReviewStoreBase
from services.review.store.keys import auto_loop_name
from services.review.store.model import (
    ACTIVATION_REASONS_KEY,
    FAILURE_EXPIRED,
    MAX_ID_CHARS,
    MAX_LIST_RESULTS,
    MAX_REVIEWER_CHARS,
    AlreadyExists,
    Decision,
    Delivery,
    ExpiryReport,
    InvalidState,
    Loop,
    LoopStatus,
    NotFound,
    NotYourLease,
)
from services.review.store.schema import SCHEMA_VERSION
from services.review.store.sqlite import ReviewStore

__all__ = [
    "ACTIVATION_REASONS_KEY",
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
    "Loop",
    "LoopStatus",
    "NotFound",
    "NotYourLease",
    "ReviewStore",
    "ReviewStoreBase",
    "auto_loop_name",
]
