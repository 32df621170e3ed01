"""What every review store backend shares: the interface and its semantics, argument checks, work events."""

from __future__ import annotations

import abc
import builtins
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.review.flows import FlowDefinition, InvalidArgument, ResultSummary, check_name
from services.review.store.keys import (
    IMAGE_NAME,
    auto_loop_name,
    canonical,
    check_id,
    decode_token,
    encode_token,
    sha256,
)
from services.review.store.model import (
    ACTIVATION_REASONS_KEY,
    MAX_LIST_RESULTS,
    MAX_REVIEWER_CHARS,
    AlreadyExists,
    Decision,
    Delivery,
    ExpiryReport,
    LeaseBatch,
    Loop,
    LoopStatus,
    WorkEvent,
    parse_status,
)
from services.review.store.schema import row_loop

logger = logging.getLogger("medgate.review.store")


class Changes:
    """The work events of one transaction, collected as it runs and published once it committed."""

    def __init__(self) -> None:
        self.flows: Counter[str] = Counter()
        self.reviewers: set[str] = set()

    def work(self, flow: str, count: int = 1) -> None:
        if count > 0:
            self.flows[flow] += count

    def freed(self, reviewers: Iterable[str]) -> None:
        self.reviewers.update(reviewers)

    def event(self) -> WorkEvent:
        return WorkEvent(dict(self.flows), frozenset(self.reviewers))


@dataclass(frozen=True)
class StartInput:
    """A start_loop call's arguments, checked, with the digest that makes the loop name idempotent."""

    content_json: str
    images: dict[str, bytes]
    digest: str


@dataclass(frozen=True)
class SubmitInput:
    """A submit call's arguments, checked, with the answer's canonical JSON."""

    decision_id: str
    reviewer_id: str
    answer: Mapping[str, Any]
    answer_json: str
    delivery_id: str | None
    loop_name: str | None
    issuer: str | None
    subject: str | None


@dataclass(frozen=True)
class ListQuery:
    """A list call's filters, checked; ``after`` is the decoded page token (created_at, seq)."""

    key: str
    flow: str | None
    status: str | None
    created_after: float | None
    created_before: float | None
    ascending: bool
    max_results: int
    after: tuple[float, int] | None

    def sql(self, mark: str) -> tuple[str, tuple[Any, ...]]:
        """``SELECT`` of one page (one row more, to know whether another page follows) with ``mark`` as the
        driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg): the same query on both backends."""
        where, params = ["1 = 1"], []
        for clause, value in (
            ("flow = {}", self.flow),
            ("status = {}", self.status),
            ("created_at >= {}", self.created_after),
            ("created_at < {}", self.created_before),
        ):
            if value is not None:
                where.append(clause.format(mark))
                params.append(value)
        if self.after is not None:
            where.append(f"(created_at, seq) {'>' if self.ascending else '<'} ({mark}, {mark})")
            params.extend(self.after)
        order = "ASC" if self.ascending else "DESC"
        query = f"SELECT * FROM loops WHERE {' AND '.join(where)} ORDER BY created_at {order}, seq {order} LIMIT {mark}"
        return query, (*params, self.max_results + 1)

    def page(self, rows: Sequence[Any]) -> tuple[list[Loop], str | None]:
        """The loops of a page and the token of the next one (None on the last page)."""
        page = rows[: self.max_results]
        token = None
        if len(rows) > self.max_results:
            token = encode_token(page[-1]["created_at"], page[-1]["seq"], self.key)
        return [row_loop(row) for row in page], token


class ReviewStoreBase(abc.ABC):
    """Human loops, deliveries and decisions; thread-safe. A backend supplies storage, this class the rest.

    Semantics, where A2I leaves us free:

    * **Loops.** The loop name is the idempotency key. ``start_loop`` with a known name and the same
      input (flow, input content, input hash and image bytes) returns the existing loop, whatever its
      status; a different input raises :class:`AlreadyExists`. Flow limits (task count, lifetime, time
      limit) are copied into the loop when it starts, so editing a flow file never changes running loops.
    * **Statuses.** ``InProgress`` until ``task_count`` decisions (``Completed``), ``stop`` (``Stopped``,
      at once: there is no asynchronous worker, so ``Stopping`` is never stored), or expiry after
      ``task_availability_lifetime_s`` (``Failed``, ``FailureCode="Expired"``). Decisions already made
      on a stopped or failed loop are kept. ``delete`` is allowed for Completed, Failed and Stopped loops
      only (as A2I) and removes the loop's images, deliveries and decisions.
    * **Delivery.** A lease lasts the loop's ``task_time_limit_s``. A reviewer never holds two leases
      on one loop and never gets a loop it answered or released (release means "not for me"); a lease
      that expired may come back to the same reviewer (at-least-once). Expired leases return to the
      queue on every write and on :meth:`expire`. SQLite: leases still open when a store is opened were
      lost with the previous process and go back to the queue at once. PostgreSQL: other replicas may be
      serving them, so they stay; a reviewer that reconnects (to any replica) gets its open leases again
      (:meth:`open_deliveries`), and the others return when their time limit passes.
    * **Decisions.** Idempotent by decision id: the same id with the same (loop, reviewer, answer)
      returns the recorded decision (``replayed=True``), even after the loop completed; the same id with
      anything else raises :class:`AlreadyExists`. The delivery id is not part of the payload, so a client
      that re-received a case after a restart may resend its decision under the new delivery. A late
      decision (lease expired or released) is accepted while the loop is open and the reviewer has not
      answered it, rather than throwing a radiologist's work away; when the last needed answer arrives,
      other open leases on the loop are cancelled. ``submit`` returns only after the transaction is
      committed (SQLite ``synchronous=FULL``; PostgreSQL's commit): an acknowledged decision is on disk.
    * **Images** (e.g. PNG bytes of the letterboxed image) live in a table of the same database, so a
      loop and its images are created, backed up and deleted atomically.
    * **Renewal.** ``renew`` extends an open lease by the loop's time limit from now (never past the
      loop's own expiry), for a reviewer still working on the case; an ended lease is :class:`InvalidState`
      (the case may be someone else's by now, though a late decision is still accepted as above).
    * **Waiting.** Every commit that may matter to a waiting reviewer publishes a :class:`WorkEvent`
      (new cases per flow, reviewers with a free slot) to :meth:`listen` callbacks, so a server wakes
      one waiting reviewer of the flow per new case instead of every stream. :attr:`work_version` grows
      whenever deliverable work may have appeared; block on :meth:`wait_for_work` from a thread, or
      bridge to asyncio with ``store.subscribe(lambda v: loop.call_soon_threadsafe(event.set))``;
      :meth:`next_deadline` says when to call :meth:`expire` next. The PostgreSQL store also delivers
      the events of other replicas (``LISTEN/NOTIFY``).
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._work_version = 0
        self._listeners: builtins.list[Callable[[int], object]] = []
        self._event_listeners: builtins.list[Callable[[WorkEvent], object]] = []

    # -- the interface every backend implements --------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ReviewStoreBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start_loop(
        self,
        flow: FlowDefinition,
        name: str,
        input_content: Mapping[str, Any],
        input_hash: str,
        *,
        images: Mapping[str, bytes] | None = None,
    ) -> Loop:
        """Start a loop, or return the one already started under this name with the same input."""
        return self._start_loop(
            flow, name, input_hash, self._checked_start(flow, name, input_content, input_hash, images)
        )

    @abc.abstractmethod
    def _start_loop(self, flow: FlowDefinition, name: str, input_hash: str, checked: StartInput) -> Loop:
        """:meth:`start_loop`, its arguments checked."""

    @abc.abstractmethod
    def describe(self, name: str) -> Loop: ...

    @abc.abstractmethod
    def images(self, name: str, *, with_dicom: bool = False) -> dict[str, bytes]:
        """The images attached to a loop, in attachment order; the DICOM source and its context
        (:data:`DICOM_SOURCE_NAME`, :data:`DICOM_CONTEXT_NAME`) only with ``with_dicom``: they hold patient
        data for the verified DICOM result and never go to reviewers or exports."""

    def list(
        self,
        *,
        flow: str | None = None,
        status: LoopStatus | str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        ascending: bool = False,
        max_results: int = MAX_LIST_RESULTS,
        next_token: str | None = None,
    ) -> tuple[builtins.list[Loop], str | None]:
        """ListHumanLoops: by creation time (newest first unless ``ascending``), paged by token.

        ``created_after`` is inclusive and ``created_before`` exclusive (epoch seconds), so adjacent
        windows neither overlap nor leave gaps. A token only continues the query that issued it.
        """
        return self._list(
            self._list_query(flow, status, created_after, created_before, ascending, max_results, next_token)
        )

    @abc.abstractmethod
    def _list(self, query: ListQuery) -> tuple[builtins.list[Loop], str | None]:
        """:meth:`list`, its arguments checked."""

    @abc.abstractmethod
    def stop(self, name: str) -> Loop:
        """StopHumanLoop: no more deliveries; open leases are cancelled. Stopping a stopped loop is a no-op."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """DeleteHumanLoop: only for Completed, Failed or Stopped loops; removes everything about it."""

    def lease(
        self, reviewer_id: str, flows: Sequence[str], *, max_in_flight: int = 1, count: int = 1
    ) -> builtins.list[Delivery]:
        """Lease up to ``count`` cases (oldest first) without exceeding ``max_in_flight`` open leases."""
        return builtins.list(self.lease_batch(reviewer_id, flows, max_in_flight=max_in_flight, count=count).deliveries)

    @abc.abstractmethod
    def lease_batch(
        self, reviewer_id: str, flows: Sequence[str], *, max_in_flight: int = 1, count: int = 1
    ) -> LeaseBatch:
        """:meth:`lease`, also saying how many more the reviewer may hold, so a stream knows what to wait for."""

    @abc.abstractmethod
    def renew(self, delivery_id: str, reviewer_id: str) -> Delivery:
        """Extend an open lease by its loop's time limit from now (capped by the loop's expiry).

        :class:`NotFound` for an unknown delivery, :class:`NotYourLease` for another reviewer's, and
        :class:`InvalidState` for a lease that already ended (answered, released, expired, cancelled).
        """

    @abc.abstractmethod
    def release(self, delivery_id: str, reviewer_id: str) -> None:
        """Give a case back unanswered; it returns to the queue for other reviewers. Idempotent.

        Raises :class:`NotFound` for an unknown delivery and :class:`NotYourLease` for another reviewer's.
        """

    def submit(
        self,
        decision_id: str,
        reviewer_id: str,
        answer: Mapping[str, Any],
        *,
        delivery_id: str | None = None,
        loop_name: str | None = None,
        issuer: str | None = None,
        subject: str | None = None,
    ) -> Decision:
        """Record a reviewer's answer for a delivery (or a loop by name); durable when it returns.

        ``issuer`` and ``subject``: the token that verified the reviewer (``reviewer_id`` is then its
        ``issuer#subject``), kept with the decision for A2I's identityData; both None without tokens.
        A delivery of another reviewer raises :class:`NotYourLease`, an unknown one :class:`NotFound`.
        """
        return self._submit(
            self._checked_submit(decision_id, reviewer_id, answer, delivery_id, loop_name, issuer, subject)
        )

    @abc.abstractmethod
    def _submit(self, checked: SubmitInput) -> Decision:
        """:meth:`submit`, its arguments checked."""

    @abc.abstractmethod
    def decisions(self, name: str) -> builtins.list[Decision]:
        """A loop's recorded decisions in submission order."""

    @abc.abstractmethod
    def expire(self) -> ExpiryReport:
        """Fail loops past their availability lifetime and requeue leases past their time limit."""

    @abc.abstractmethod
    def next_deadline(self) -> float | None:
        """The earliest lease or loop expiry, so a server knows when :meth:`expire` has work to do."""

    @abc.abstractmethod
    def queue_depth(self, flow: str | None = None) -> int:
        """Reviewer slots waiting for a lease: per open loop, task_count minus answers minus open leases."""

    @abc.abstractmethod
    def loop_of_delivery(self, delivery_id: str) -> Loop:
        """The loop a delivery belongs to (NotFound for an unknown delivery id)."""

    @abc.abstractmethod
    def open_deliveries(self, reviewer_id: str) -> builtins.list[Delivery]:
        """The reviewer's leases that are still open, oldest first: re-sent when a reviewer reconnects."""

    @abc.abstractmethod
    def in_flight(self, reviewer_id: str) -> int:
        """Open leases held by a reviewer."""

    @abc.abstractmethod
    def pending_outputs(self, flow: str | None = None) -> builtins.list[Loop]:
        """Completed loops whose output.json is not written yet (kept across crashes: an outbox)."""

    @abc.abstractmethod
    def mark_output(self, name: str, output_path: str) -> None: ...

    @abc.abstractmethod
    def pending_dicom(self, limit: int = MAX_LIST_RESULTS) -> builtins.list[Loop]:
        """Ended loops whose verified DICOM result is not settled yet, oldest first (an outbox: kept across
        crashes, and the same loop is built again until it is marked): Completed ones to build, and Failed
        or Stopped ones (expired, stopped) whose source is to be dropped."""

    @abc.abstractmethod
    def mark_dicom(self, name: str, state: str, note: str = "", *, drop_source: bool = False) -> None:
        """What became of a loop's verified DICOM result ('handed-over', 'failed', 'skipped'), and which or why.

        ``drop_source``: delete the DICOM source and its context in the same transaction (the store keeps patient
        pixels no longer than the verified result needs them)."""

    @abc.abstractmethod
    def dicom_state(self, name: str) -> tuple[str | None, str | None]:
        """(state, note) of a loop's verified DICOM result; (None, None) for a loop without a DICOM source."""

    # -- argument checks every backend makes alike -------------------------------------------------

    @staticmethod
    def _checked_start(
        flow: FlowDefinition,
        name: str,
        input_content: Mapping[str, Any],
        input_hash: str,
        images: Mapping[str, bytes] | None,
    ) -> StartInput:
        check_name(name, "human loop name")
        check_id(input_hash, "input_hash")
        if not isinstance(input_content, Mapping):
            raise InvalidArgument("input_content must be a JSON object")
        content_json = canonical(input_content, "input_content")
        attached: dict[str, bytes] = {}
        for image_name, data in (images or {}).items():
            if not isinstance(image_name, str) or not IMAGE_NAME.match(image_name):
                raise InvalidArgument(f"image name {image_name!r} must be a plain file name")
            if not isinstance(data, bytes | bytearray | memoryview) or not len(data):
                raise InvalidArgument(f"image {image_name} must be non-empty bytes")
            attached[image_name] = bytes(data)
        digest = sha256(
            canonical(
                {
                    "flow": flow.name,
                    "input": input_content,
                    "input_hash": input_hash,
                    "images": [[n, hashlib.sha256(d).hexdigest()] for n, d in attached.items()],
                },
                "input",
            )
        )
        return StartInput(content_json, attached, digest)

    @staticmethod
    def _checked_lease(reviewer_id: str, flows: Sequence[str], max_in_flight: int, count: int) -> builtins.list[str]:
        check_id(reviewer_id, "reviewer_id", max_chars=MAX_REVIEWER_CHARS)
        if isinstance(flows, str) or not flows:
            raise InvalidArgument("flows must be a non-empty list of flow names")
        if max_in_flight < 1 or count < 1:
            raise InvalidArgument("max_in_flight and count must be at least 1")
        return builtins.list(dict.fromkeys(flows))

    @staticmethod
    def _checked_submit(
        decision_id: str,
        reviewer_id: str,
        answer: Mapping[str, Any],
        delivery_id: str | None,
        loop_name: str | None,
        issuer: str | None,
        subject: str | None,
    ) -> SubmitInput:
        check_id(decision_id, "decision_id")
        check_id(reviewer_id, "reviewer_id", max_chars=MAX_REVIEWER_CHARS)
        if (issuer is None) != (subject is None):
            raise InvalidArgument("a verified reviewer needs both issuer and subject")
        if not isinstance(answer, Mapping):
            raise InvalidArgument("an answer must be a JSON object")
        answer_json = canonical(answer, "answer")
        if delivery_id is None and loop_name is None:
            raise InvalidArgument("submit needs a delivery_id or a loop_name")
        return SubmitInput(decision_id, reviewer_id, answer, answer_json, delivery_id, loop_name, issuer, subject)

    @staticmethod
    def _decision_digest(loop_name: str, reviewer_id: str, answer: Mapping[str, Any]) -> str:
        return sha256(canonical({"loop": loop_name, "reviewer": reviewer_id, "answer": answer}, "decision"))

    @staticmethod
    def _list_query(
        flow: str | None,
        status: LoopStatus | str | None,
        created_after: float | None,
        created_before: float | None,
        ascending: bool,
        max_results: int,
        next_token: str | None,
    ) -> ListQuery:
        if isinstance(max_results, bool) or not isinstance(max_results, int) or not 0 < max_results <= MAX_LIST_RESULTS:
            raise InvalidArgument(f"max_results must be 1-{MAX_LIST_RESULTS}")
        status_value = None if status is None else str(parse_status(status))
        key = sha256(canonical([flow, status_value, created_after, created_before, ascending], "query"))[:16]
        after = None if next_token is None else decode_token(next_token, key)
        return ListQuery(
            key,
            flow,
            status_value,
            None if created_after is None else float(created_after),
            None if created_before is None else float(created_before),
            ascending,
            max_results,
            after,
        )

    # -- waiting for work ---------------------------------------------------------------------

    @property
    def work_version(self) -> int:
        with self._changed:
            return self._work_version

    def wait_for_work(self, since: int, timeout_s: float | None = None) -> int:
        """Block until :attr:`work_version` exceeds ``since`` (or the timeout); return the version."""
        with self._changed:
            self._changed.wait_for(lambda: self._work_version > since, timeout_s)
            return self._work_version

    def subscribe(self, callback: Callable[[int], object]) -> Callable[[], None]:
        """Call ``callback(version)`` after each commit that may have added work; returns unsubscribe.

        The callback runs on the committing thread and must be quick and never raise (an asyncio
        server passes ``loop.call_soon_threadsafe``-based callbacks).
        """
        return self._add_listener(self._listeners, callback)

    def listen(self, callback: Callable[[WorkEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for each :class:`WorkEvent` (this store's commits and, on PostgreSQL,
        other replicas'); returns unsubscribe. Same rules as :meth:`subscribe`'s callbacks."""
        return self._add_listener(self._event_listeners, callback)

    def _add_listener(self, listeners: builtins.list[Any], callback: Any) -> Callable[[], None]:
        with self._changed:
            listeners.append(callback)

        def unsubscribe() -> None:
            with self._changed:
                if callback in listeners:
                    listeners.remove(callback)

        return unsubscribe

    def _publish(self, event: WorkEvent) -> None:
        """Tell waiters what a commit changed (call after the commit, never inside a transaction)."""
        if not event:
            return
        with self._changed:
            work = bool(event.flows) or event.everything
            if work:
                self._work_version += 1
                self._changed.notify_all()
            version = self._work_version
            listeners = builtins.list(self._listeners) if work else []
            event_listeners = builtins.list(self._event_listeners)
        for callback in listeners:
            try:
                callback(version)
            except Exception:
                logger.exception("review store listener failed")
        for event_callback in event_listeners:
            try:
                event_callback(event)
            except Exception:
                logger.exception("review store listener failed")

    # -- loops ----------------------------------------------------------------------------------

    def start_if_activated(
        self,
        flow: FlowDefinition,
        summary: ResultSummary,
        input_content: Mapping[str, Any],
        *,
        images: Mapping[str, bytes] | None = None,
        name: str | None = None,
    ) -> Loop | None:
        """Start a loop when the flow's conditions match the result; ``None`` when they do not.

        The matched conditions are recorded in the input as ``humanLoopActivationReasons``. Without a
        name the loop is named by (flow, input hash), and an existing loop for the same input is
        returned even if the result changed since (one review per image per flow).
        """
        activation = flow.activation(summary)
        if not activation.matched:
            return None
        content = dict(input_content)
        content.setdefault(ACTIVATION_REASONS_KEY, builtins.list(activation.reasons))
        loop_name = name or auto_loop_name(flow.name, summary.input_hash)
        try:
            return self.start_loop(flow, loop_name, content, summary.input_hash, images=images)
        except AlreadyExists:
            if name is None:
                existing = self.describe(loop_name)
                if existing.flow == flow.name and existing.input_hash == summary.input_hash:
                    return existing
            raise
