"""The review store's records, statuses and errors: what every store backend returns and raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.review.flows import InvalidArgument, ReviewError, TaskType

MAX_LIST_RESULTS = 100
MAX_ID_CHARS = 128
# A reviewer key is ``issuer#subject`` with tokens on: an issuer URL (Azure's is 70 characters) and a
# subject (a UUID or longer) do not fit MAX_ID_CHARS.
MAX_REVIEWER_CHARS = 512
FAILURE_EXPIRED = "Expired"
ACTIVATION_REASONS_KEY = "humanLoopActivationReasons"
# A loop's attachments for its verified DICOM result: the source instance's bytes and what refers to the
# AI results (services/review/completion.py); a loop started with DICOM_SOURCE_NAME is 'pending' until then.
DICOM_SOURCE_NAME = "source.dcm"
DICOM_CONTEXT_NAME = "dicom.json"
DICOM_PENDING = "pending"
DICOM_ATTACHMENTS = (DICOM_SOURCE_NAME, DICOM_CONTEXT_NAME)


def initial_dicom_state(images: Mapping[str, bytes]) -> str | None:
    """A new loop's dicom_state: pending when it carries a DICOM source for a verified result, else none."""
    return DICOM_PENDING if DICOM_SOURCE_NAME in images else None


class NotFound(ReviewError, LookupError):
    """No such loop or delivery (maps to NOT_FOUND)."""


class AlreadyExists(ReviewError):
    """A loop name or decision id reused with different content, or a second answer (ALREADY_EXISTS)."""


class NotYourLease(ReviewError):
    """A delivery leased to another reviewer, or a reviewer id other than the caller's own (PERMISSION_DENIED).

    Not a :class:`PermissionError`: that is an ``OSError``, and file-writing code that catches ``OSError``
    would swallow it.
    """


class StoreUnavailable(ReviewError):
    """The store's database cannot be reached now (maps to UNAVAILABLE: the caller may try again)."""


class InvalidState(ReviewError):
    """The loop's status does not allow the operation (maps to FAILED_PRECONDITION)."""


class LoopStatus(StrEnum):
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"
    STOPPING = "Stopping"


OPEN_STATUSES = (LoopStatus.IN_PROGRESS, LoopStatus.STOPPING)


@dataclass(frozen=True)
class Loop:
    """A human loop as DescribeHumanLoop would show it, plus its queue counters."""

    name: str
    flow: str
    task_type: TaskType
    status: LoopStatus
    input_content: dict[str, Any]
    input_hash: str
    image_names: tuple[str, ...]
    task_count: int
    answers: int
    task_time_limit_s: float
    created_at: float
    expires_at: float
    ended_at: float | None
    failure_code: str | None
    failure_reason: str | None
    output_path: str | None
    # The verified DICOM result's state and note (services/review/completion.py); None without a DICOM source.
    dicom_state: str | None = None
    dicom_note: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One lease of a loop to a reviewer; answer it with ``submit(..., delivery_id=...)``."""

    delivery_id: str
    reviewer_id: str
    loop: Loop
    leased_at: float
    lease_expires_at: float


@dataclass(frozen=True)
class Decision:
    """A recorded answer; ``loop_status`` is the loop's status after it (Completed for the last one).

    ``reviewer_id`` is the store's key for the reviewer: ``issuer#subject`` when the reviewer was
    verified by a token (then ``issuer`` and ``subject`` are its parts, for A2I's identityData), the
    request's reviewer id otherwise (development without tokens; both None).
    """

    decision_id: str
    loop_name: str
    reviewer_id: str
    delivery_id: str | None
    answer: dict[str, Any]
    accepted_at: float
    submitted_at: float
    loop_status: LoopStatus
    replayed: bool = False
    issuer: str | None = None
    subject: str | None = None

    @property
    def worker_id(self) -> str:
        """A2I's workerId: the token's subject, or the development reviewer id."""
        return self.subject if self.subject is not None else self.reviewer_id

    @property
    def time_spent_s(self) -> float:
        return max(0.0, self.submitted_at - self.accepted_at)


@dataclass(frozen=True)
class LeaseBatch:
    """What one lease call took, and how many more cases the reviewer may hold (0: it is full)."""

    deliveries: tuple[Delivery, ...]
    free_slots: int


@dataclass(frozen=True)
class ExpiryReport:
    failed_loops: tuple[str, ...]
    expired_leases: int


@dataclass(frozen=True)
class WorkEvent:
    """What one commit changed for waiting reviewers.

    ``flows``: cases that became deliverable, per flow (a loop started: its task count; a lease released
    or expired: one). ``reviewers``: reviewers whose lease ended (answered, released, expired, cancelled),
    so they have room for another case; ``"*"`` stands for all of them (too many to name). ``everything``:
    notifications may have been lost (the PostgreSQL listener reconnected), every waiter looks again.
    """

    flows: Mapping[str, int] = field(default_factory=dict)
    reviewers: frozenset[str] = frozenset()
    everything: bool = False

    def __bool__(self) -> bool:
        return bool(self.flows or self.reviewers or self.everything)


ALL_REVIEWERS = "*"


def parse_status(value: LoopStatus | str) -> LoopStatus:
    try:
        return LoopStatus(value)
    except ValueError:
        raise InvalidArgument(f"status {value!r} must be one of {', '.join(s.value for s in LoopStatus)}") from None
