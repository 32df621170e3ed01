"""The SQLite review store: one file in WAL mode with synchronous=FULL, owned by one process."""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.review.flows import FlowDefinition, InvalidArgument, ReviewError
from services.review.store.base import Changes, ReviewStoreBase
from services.review.store.model import (
    DICOM_ATTACHMENTS,
    FAILURE_EXPIRED,
    MAX_LIST_RESULTS,
    OPEN_STATUSES,
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
    initial_dicom_state,
    parse_status,
)
from services.review.store.schema import migrate, row_decision, row_loop

logger = logging.getLogger("medgate.review.store")


class ReviewStore(ReviewStoreBase):
    """Human loops, deliveries and decisions in one SQLite file; thread-safe; ``now`` is injectable.

    The semantics are :class:`ReviewStoreBase`'s. One process owns a database file (the connection is
    shared by threads under a lock); several review replicas need the PostgreSQL store instead
    (:mod:`services.review.store.postgres`). Work events are published to this process's listeners only.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        now: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
        owner: bool = True,
    ) -> None:
        """``owner=False`` opens the file beside a running review service (exports, reports) without
        taking over its leases."""
        super().__init__()
        self.path = Path(path)
        self._now = now
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            self._conn.close()
            raise ReviewError(f"{self.path.name}: SQLite refused WAL mode (got {mode})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._closed = False
        self._migrate()
        requeued = self._requeue_abandoned() if owner else 0
        if requeued:
            logger.info("%s: %d leases from the previous run went back to the queue", self.path.name, requeued)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> ReviewStore:
        return self

    def _migrate(self) -> None:
        with self._lock:
            migrate(self._conn, self.path.name)

    def _requeue_abandoned(self) -> int:
        """Leases open at start-up belonged to a process that is gone: nobody will answer them."""
        with self._transaction() as (conn, changes):
            rows = conn.execute(
                "UPDATE deliveries SET state = 'expired', ended_at = ? WHERE state = 'leased'"
                " RETURNING reviewer, (SELECT flow FROM loops WHERE seq = loop_seq) AS flow",
                (self._now(),),
            ).fetchall()
            self._requeued(changes, rows)
        return len(rows)

    @contextmanager
    def _transaction(self) -> Iterator[tuple[sqlite3.Connection, Changes]]:
        """One write transaction; BEGIN IMMEDIATE so it never fails half way on a lock upgrade.

        Its work events are published once it committed (never for a rolled-back one).
        """
        changes = Changes()
        with self._lock:
            if self._closed:
                raise ReviewError("the review store is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn, changes
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        self._publish(changes.event())

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise ReviewError("the review store is closed")
            yield self._conn

    # -- waiting for work ---------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest lease or loop expiry, so a server knows when :meth:`expire` has work to do."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT MIN(t) FROM ("
                " SELECT MIN(lease_expires_at) AS t FROM deliveries WHERE state = 'leased'"
                " UNION ALL SELECT MIN(expires_at) FROM loops WHERE status = 'InProgress')"
            ).fetchone()
        return None if row[0] is None else float(row[0])

    # -- loops ----------------------------------------------------------------------------------

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
        checked = self._checked_start(flow, name, input_content, input_hash, images)
        attached = checked.images
        now = self._now()
        with self._transaction() as (conn, changes):
            self._expire_in(conn, now, changes)
            row = conn.execute("SELECT input_digest FROM loops WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if row["input_digest"] != checked.digest:
                    raise AlreadyExists(f"human loop {name} already exists with a different input")
            else:
                seq = conn.execute(
                    "INSERT INTO loops (name, flow, task_type, status, input_json, input_hash, input_digest,"
                    " image_names, task_count, task_time_limit_s, created_at, expires_at, dicom_state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        flow.name,
                        str(flow.task_type),
                        str(LoopStatus.IN_PROGRESS),
                        checked.content_json,
                        input_hash,
                        checked.digest,
                        json.dumps(builtins.list(attached)),
                        flow.task_count,
                        flow.task_time_limit_s,
                        now,
                        now + flow.task_availability_lifetime_s,
                        initial_dicom_state(attached),
                    ),
                ).lastrowid
                conn.executemany(
                    "INSERT INTO images (loop_seq, position, name, data) VALUES (?, ?, ?, ?)",
                    [(seq, i, n, d) for i, (n, d) in enumerate(attached.items())],
                )
                changes.work(flow.name, flow.task_count)
            loop = self._loop(conn, name)
        return loop

    def describe(self, name: str) -> Loop:
        self._sweep_if_due()
        with self._reading() as conn:
            return self._loop(conn, name)

    def images(self, name: str, *, with_dicom: bool = False) -> dict[str, bytes]:
        """The images attached to a loop, in attachment order (the DICOM source only ``with_dicom``)."""
        hidden = () if with_dicom else DICOM_ATTACHMENTS
        with self._reading() as conn:
            seq = self._seq(conn, name)
            rows = conn.execute(
                "SELECT name, data FROM images WHERE loop_seq = ? AND name NOT IN (?, ?) ORDER BY position",
                (seq, *(hidden or ("", ""))),
            )
            return {row["name"]: bytes(row["data"]) for row in rows}

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
        """ListHumanLoops: by creation time (newest first unless ``ascending``), paged by token."""
        query = self._list_query(flow, status, created_after, created_before, ascending, max_results, next_token)
        sql, params = query.sql("?")
        self._sweep_if_due()
        with self._reading() as conn:
            return query.page(conn.execute(sql, params).fetchall())

    def stop(self, name: str) -> Loop:
        """StopHumanLoop: no more deliveries; open leases are cancelled. Stopping a stopped loop is a no-op."""
        now = self._now()
        with self._transaction() as (conn, changes):
            self._expire_in(conn, now, changes)
            loop = self._loop(conn, name)
            if loop.status in (LoopStatus.COMPLETED, LoopStatus.FAILED):
                raise InvalidState(f"human loop {name} is {loop.status} and cannot be stopped")
            if loop.status is not LoopStatus.STOPPED:
                conn.execute(
                    "UPDATE loops SET status = ?, ended_at = ? WHERE name = ?", (str(LoopStatus.STOPPED), now, name)
                )
                changes.freed(self._cancel_leases(conn, now))
                loop = self._loop(conn, name)
        return loop

    def delete(self, name: str) -> None:
        """DeleteHumanLoop: only for Completed, Failed or Stopped loops; removes everything about it."""
        with self._transaction() as (conn, changes):
            self._expire_in(conn, self._now(), changes)
            loop = self._loop(conn, name)
            if loop.status in OPEN_STATUSES:
                raise InvalidState(f"human loop {name} is {loop.status}; stop it before deleting it")
            conn.execute("DELETE FROM loops WHERE name = ?", (name,))

    # -- delivery -------------------------------------------------------------------------------

    def lease_batch(
        self, reviewer_id: str, flows: Sequence[str], *, max_in_flight: int = 1, count: int = 1
    ) -> LeaseBatch:
        """:meth:`lease`, also saying how many more the reviewer may hold, so a stream knows what to wait for."""
        flow_names = self._checked_lease(reviewer_id, flows, max_in_flight, count)
        now = self._now()
        deliveries: builtins.list[Delivery] = []
        with self._transaction() as (conn, changes):
            self._expire_in(conn, now, changes)
            in_flight = conn.execute(
                "SELECT COUNT(*) FROM deliveries WHERE reviewer = ? AND state = 'leased'", (reviewer_id,)
            ).fetchone()[0]
            room = min(count, max_in_flight - in_flight)
            if room > 0:
                marks = ", ".join("?" * len(flow_names))
                rows = conn.execute(
                    f"SELECT * FROM loops AS l WHERE l.status = 'InProgress' AND l.flow IN ({marks})"
                    " AND l.expires_at > ?"
                    " AND l.answers + (SELECT COUNT(*) FROM deliveries AS d"
                    "   WHERE d.loop_seq = l.seq AND d.state = 'leased') < l.task_count"
                    " AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.loop_seq = l.seq"
                    "   AND d.reviewer = ? AND d.state IN ('leased', 'released'))"
                    " AND NOT EXISTS (SELECT 1 FROM decisions AS x WHERE x.loop_seq = l.seq AND x.reviewer = ?)"
                    " ORDER BY l.seq LIMIT ?",
                    (*flow_names, now, reviewer_id, reviewer_id, room),
                ).fetchall()
                for row in rows:
                    delivery_id = uuid.uuid4().hex
                    expires = min(now + row["task_time_limit_s"], row["expires_at"])
                    conn.execute(
                        "INSERT INTO deliveries (id, loop_seq, reviewer, state, leased_at, lease_expires_at)"
                        " VALUES (?, ?, ?, 'leased', ?, ?)",
                        (delivery_id, row["seq"], reviewer_id, now, expires),
                    )
                    deliveries.append(Delivery(delivery_id, reviewer_id, row_loop(row), now, expires))
        return LeaseBatch(tuple(deliveries), max(0, max_in_flight - in_flight - len(deliveries)))

    def renew(self, delivery_id: str, reviewer_id: str) -> Delivery:
        """Extend an open lease by its loop's time limit from now (capped by the loop's expiry)."""
        now = self._now()
        with self._transaction() as (conn, changes):
            self._expire_in(conn, now, changes)
            row = conn.execute(
                "SELECT d.reviewer, d.state, d.leased_at, l.* FROM deliveries AS d"
                " JOIN loops AS l ON l.seq = d.loop_seq WHERE d.id = ?",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"delivery {delivery_id} not found")
            if row["reviewer"] != reviewer_id:
                raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
            if row["state"] != "leased":
                raise InvalidState(f"delivery {delivery_id} is {row['state']}; only an open lease can be renewed")
            expires = min(now + row["task_time_limit_s"], row["expires_at"])
            conn.execute("UPDATE deliveries SET lease_expires_at = ? WHERE id = ?", (expires, delivery_id))
        return Delivery(delivery_id, reviewer_id, row_loop(row), row["leased_at"], expires)

    def release(self, delivery_id: str, reviewer_id: str) -> None:
        """Give a case back unanswered; it returns to the queue for other reviewers. Idempotent."""
        now = self._now()
        with self._transaction() as (conn, changes):
            self._expire_in(conn, now, changes)
            row = conn.execute(
                "SELECT d.reviewer, d.state, l.flow FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq"
                " WHERE d.id = ?",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"delivery {delivery_id} not found")
            if row["reviewer"] != reviewer_id:
                raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
            if row["state"] == "leased":
                conn.execute("UPDATE deliveries SET state = 'released', ended_at = ? WHERE id = ?", (now, delivery_id))
                changes.work(row["flow"])
                changes.freed([reviewer_id])

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
        """Record a reviewer's answer for a delivery (or a loop by name); durable when it returns."""
        answer_json = self._checked_submit(decision_id, reviewer_id, answer, delivery_id, loop_name, issuer, subject)
        now = self._now()
        with self._transaction() as (conn, changes):
            self._expire_in(conn, now, changes)
            accepted_at: float | None = None
            if delivery_id is not None:
                row = conn.execute(
                    "SELECT d.reviewer, d.leased_at, l.name FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq"
                    " WHERE d.id = ?",
                    (delivery_id,),
                ).fetchone()
                if row is None:
                    raise NotFound(f"delivery {delivery_id} not found")
                if row["reviewer"] != reviewer_id:
                    raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
                if loop_name is not None and loop_name != row["name"]:
                    raise InvalidArgument(f"delivery {delivery_id} is not for human loop {loop_name}")
                loop_name, accepted_at = row["name"], row["leased_at"]
            if loop_name is None:  # unreachable: checked above; narrows the type
                raise InvalidArgument("submit needs a delivery_id or a loop_name")
            loop_row = self._loop_row(conn, loop_name)
            payload = self._decision_digest(loop_name, reviewer_id, answer)
            existing = conn.execute("SELECT * FROM decisions WHERE id = ?", (decision_id,)).fetchone()
            if existing is not None:
                if existing["payload_digest"] != payload:
                    raise AlreadyExists(f"decision {decision_id} was already recorded with a different payload")
                return row_decision(existing, loop_name, parse_status(loop_row["status"]), replayed=True)
            loop = row_loop(loop_row)
            if loop.status is not LoopStatus.IN_PROGRESS:
                raise InvalidState(f"human loop {loop_name} is {loop.status}; it takes no more answers")
            previous = conn.execute(
                "SELECT id FROM decisions WHERE loop_seq = ? AND reviewer = ?", (loop_row["seq"], reviewer_id)
            ).fetchone()
            if previous is not None:
                raise AlreadyExists(f"reviewer {reviewer_id} already answered human loop {loop_name}")
            if accepted_at is None:
                lease_row = conn.execute(
                    "SELECT MAX(leased_at) FROM deliveries WHERE loop_seq = ? AND reviewer = ?",
                    (loop_row["seq"], reviewer_id),
                ).fetchone()
                accepted_at = now if lease_row[0] is None else float(lease_row[0])
            conn.execute(
                "INSERT INTO decisions (id, loop_seq, reviewer, delivery_id, answer_json, payload_digest,"
                " accepted_at, submitted_at, reviewer_issuer, reviewer_subject) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    decision_id,
                    loop_row["seq"],
                    reviewer_id,
                    delivery_id,
                    answer_json,
                    payload,
                    accepted_at,
                    now,
                    issuer,
                    subject,
                ),
            )
            conn.execute(
                "UPDATE deliveries SET state = 'answered', ended_at = ?"
                " WHERE loop_seq = ? AND reviewer = ? AND (state = 'leased' OR id = ?)",
                (now, loop_row["seq"], reviewer_id, delivery_id),
            )
            changes.freed([reviewer_id])
            answers = loop.answers + 1
            status = LoopStatus.COMPLETED if answers >= loop.task_count else LoopStatus.IN_PROGRESS
            conn.execute(
                "UPDATE loops SET answers = ?, status = ?, ended_at = ? WHERE seq = ?",
                (answers, str(status), now if status is LoopStatus.COMPLETED else None, loop_row["seq"]),
            )
            if status is LoopStatus.COMPLETED:
                changes.freed(self._cancel_leases(conn, now))
            decision = Decision(
                decision_id,
                loop_name,
                reviewer_id,
                delivery_id,
                json.loads(answer_json),
                accepted_at,
                now,
                status,
                issuer=issuer,
                subject=subject,
            )
        return decision

    def decisions(self, name: str) -> builtins.list[Decision]:
        with self._reading() as conn:
            row = self._loop_row(conn, name)
            rows = conn.execute(
                "SELECT * FROM decisions WHERE loop_seq = ? ORDER BY submitted_at, id", (row["seq"],)
            ).fetchall()
            return [row_decision(r, name, parse_status(row["status"])) for r in rows]

    def expire(self) -> ExpiryReport:
        with self._transaction() as (conn, changes):
            failed, requeued = self._expire_in(conn, self._now(), changes)
        return ExpiryReport(tuple(failed), requeued)

    def queue_depth(self, flow: str | None = None) -> int:
        now = self._now()
        flow_filter = "" if flow is None else " AND l.flow = ?"
        with self._reading() as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(MAX(0, l.task_count - l.answers - (SELECT COUNT(*) FROM deliveries AS d"
                "   WHERE d.loop_seq = l.seq AND d.state = 'leased' AND d.lease_expires_at > ?))), 0)"
                f" FROM loops AS l WHERE l.status = 'InProgress' AND l.expires_at > ?{flow_filter}",
                (now, now) if flow is None else (now, now, flow),
            ).fetchone()
        return int(row[0])

    def loop_of_delivery(self, delivery_id: str) -> Loop:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT l.* FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq WHERE d.id = ?", (delivery_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"delivery {delivery_id} not found")
        return row_loop(row)

    def open_deliveries(self, reviewer_id: str) -> builtins.list[Delivery]:
        now = self._now()
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT d.id AS delivery_id, d.leased_at, d.lease_expires_at, l.* FROM deliveries AS d"
                " JOIN loops AS l ON l.seq = d.loop_seq"
                " WHERE d.reviewer = ? AND d.state = 'leased' AND d.lease_expires_at > ? AND l.status = 'InProgress'"
                " ORDER BY d.leased_at, l.seq",
                (reviewer_id, now),
            ).fetchall()
        return [
            Delivery(row["delivery_id"], reviewer_id, row_loop(row), row["leased_at"], row["lease_expires_at"])
            for row in rows
        ]

    def in_flight(self, reviewer_id: str) -> int:
        with self._reading() as conn:
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE reviewer = ? AND state = 'leased'", (reviewer_id,)
                ).fetchone()[0]
            )

    # -- output bookkeeping ---------------------------------------------------------------------

    def pending_outputs(self, flow: str | None = None) -> builtins.list[Loop]:
        flow_filter = "" if flow is None else " AND flow = ?"
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT * FROM loops WHERE status = 'Completed' AND output_path IS NULL{flow_filter} ORDER BY seq",
                () if flow is None else (flow,),
            ).fetchall()
        return [row_loop(row) for row in rows]

    def mark_output(self, name: str, output_path: str) -> None:
        with self._transaction() as (conn, _changes):
            self._seq(conn, name)
            conn.execute("UPDATE loops SET output_path = ? WHERE name = ?", (output_path, name))

    def pending_dicom(self, limit: int = MAX_LIST_RESULTS) -> builtins.list[Loop]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT * FROM loops WHERE dicom_state = 'pending' AND status IN ('Completed', 'Failed', 'Stopped')"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [row_loop(row) for row in rows]

    def mark_dicom(self, name: str, state: str, note: str = "", *, drop_source: bool = False) -> None:
        with self._transaction() as (conn, _changes):
            seq = self._seq(conn, name)
            conn.execute("UPDATE loops SET dicom_state = ?, dicom_note = ? WHERE name = ?", (state, note, name))
            if drop_source:
                conn.execute("DELETE FROM images WHERE loop_seq = ? AND name IN (?, ?)", (seq, *DICOM_ATTACHMENTS))

    def dicom_state(self, name: str) -> tuple[str | None, str | None]:
        with self._reading() as conn:
            self._seq(conn, name)
            row = conn.execute("SELECT dicom_state, dicom_note FROM loops WHERE name = ?", (name,)).fetchone()
        return row["dicom_state"], row["dicom_note"]

    # -- internals ------------------------------------------------------------------------------

    def _sweep_if_due(self) -> None:
        """Expire overdue loops before a read, so Describe and List never show an expired loop InProgress."""
        with self._reading() as conn:
            due = conn.execute(
                "SELECT 1 FROM loops WHERE status = 'InProgress' AND expires_at <= ? LIMIT 1", (self._now(),)
            ).fetchone()
        if due is not None:
            self.expire()

    def _expire_in(self, conn: sqlite3.Connection, now: float, changes: Changes) -> tuple[builtins.list[str], int]:
        failed = conn.execute(
            "SELECT name, created_at, expires_at FROM loops WHERE status = 'InProgress' AND expires_at <= ?", (now,)
        ).fetchall()
        for row in failed:
            lifetime = row["expires_at"] - row["created_at"]
            conn.execute(
                "UPDATE loops SET status = ?, failure_code = ?, failure_reason = ?, ended_at = ? WHERE name = ?",
                (
                    str(LoopStatus.FAILED),
                    FAILURE_EXPIRED,
                    f"not completed within TaskAvailabilityLifetimeInSeconds ({lifetime:g} s)",
                    now,
                    row["name"],
                ),
            )
        if failed:
            changes.freed(self._cancel_leases(conn, now))
        requeued = conn.execute(
            "UPDATE deliveries SET state = 'expired', ended_at = ? WHERE state = 'leased' AND lease_expires_at <= ?"
            " RETURNING reviewer, (SELECT flow FROM loops WHERE seq = loop_seq) AS flow",
            (now, now),
        ).fetchall()
        self._requeued(changes, requeued)
        return [row["name"] for row in failed], len(requeued)

    @staticmethod
    def _requeued(changes: Changes, rows: Iterable[sqlite3.Row]) -> None:
        """Leases that went back to the queue: a case for the flow, a free slot for the reviewer."""
        for row in rows:
            changes.work(row["flow"])
            changes.freed([row["reviewer"]])

    @staticmethod
    def _cancel_leases(conn: sqlite3.Connection, now: float) -> builtins.list[str]:
        """Close open leases on loops that take no more answers; the reviewers who held them."""
        rows = conn.execute(
            "UPDATE deliveries SET state = 'cancelled', ended_at = ? WHERE state = 'leased'"
            " AND loop_seq IN (SELECT seq FROM loops WHERE status != 'InProgress') RETURNING reviewer",
            (now,),
        ).fetchall()
        return [row["reviewer"] for row in rows]

    @staticmethod
    def _loop_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM loops WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"human loop {name} not found")
        return row

    def _loop(self, conn: sqlite3.Connection, name: str) -> Loop:
        return row_loop(self._loop_row(conn, name))

    def _seq(self, conn: sqlite3.Connection, name: str) -> int:
        return int(self._loop_row(conn, name)["seq"])
