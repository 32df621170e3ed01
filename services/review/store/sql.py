"""What the SQLite and PostgreSQL stores run alike: one statement text for both, in each backend's transactions.

Statements are written with ``?`` placeholders and translated by :meth:`SqlReviewStore._sql` to the driver's
(``%s`` for psycopg). A backend supplies its transactions (:meth:`~SqlReviewStore._write`,
:meth:`~SqlReviewStore._read`), its row locks (:meth:`~SqlReviewStore._for_update`), its expiry sweep and
lease cancellation, and the operations whose SQL really differs (leasing, the next deadline, its lifecycle).
"""

from __future__ import annotations

import abc
import builtins
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, NoReturn, Protocol, TypeVar

from services.review.flows import FlowDefinition, InvalidArgument, ReviewError
from services.review.store.base import Changes, ListQuery, ReviewStoreBase, StartInput, SubmitInput
from services.review.store.model import (
    DICOM_ATTACHMENTS,
    MAX_LIST_RESULTS,
    OPEN_STATUSES,
    AlreadyExists,
    Decision,
    Delivery,
    ExpiryReport,
    InvalidState,
    Loop,
    LoopStatus,
    NotFound,
    NotYourLease,
    initial_dicom_state,
    parse_status,
)
from services.review.store.schema import row_decision, row_loop


class Cursor(Protocol):
    """What the shared statements use of a cursor: sqlite3's and psycopg's alike."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...

    def executemany(self, query: str, params_seq: Iterable[Sequence[Any]], /) -> object: ...

    def close(self) -> None: ...


class Connection(Protocol):
    """What the shared statements use of a connection: ``sqlite3.Connection`` and psycopg's alike."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def cursor(self) -> Cursor: ...


C = TypeVar("C", bound=Connection)
T = TypeVar("T")


def one(cursor: Cursor) -> Any:
    """The row of a query that always has exactly one (an aggregate, EXISTS)."""
    row = cursor.fetchone()
    if row is None:
        raise ReviewError("the database answered an aggregate query without a row")
    return row


class SqlReviewStore(ReviewStoreBase, Generic[C]):
    """The operations whose SQL is the same on every backend, run in the backend's transactions."""

    # The driver's placeholder for the shared statements' ``?``.
    PLACEHOLDER: ClassVar[str]
    # The SQL function for the larger of two values: SQLite's scalar MAX, PostgreSQL's GREATEST.
    GREATEST: ClassVar[str]

    _now: Callable[[], float]

    # -- what each backend supplies ------------------------------------------------------------

    @abc.abstractmethod
    def _write(self, work: Callable[[C, Changes], T]) -> T:
        """Run ``work`` in one write transaction; publish its work events once it committed."""

    @abc.abstractmethod
    def _read(self, work: Callable[[C], T]) -> T:
        """Run ``work`` on a connection outside any write transaction."""

    @abc.abstractmethod
    def _expire_in(self, conn: C, now: float, changes: Changes) -> tuple[builtins.list[str], int]:
        """Fail overdue loops and requeue overdue leases (in every write); the failed loops' names and the
        number of leases requeued."""

    @abc.abstractmethod
    def _cancel_leases(self, conn: C, now: float, loop_seqs: Iterable[int]) -> builtins.list[str]:
        """Close open leases on loops (``loop_seqs``) that take no more answers; the reviewers who held them."""

    def _for_update(self, of: str = "") -> str:
        """The clause that locks the rows a statement reads (of table ``of``) until the transaction ends.

        None by default: SQLite's write transactions (``BEGIN IMMEDIATE``) already run one at a time."""
        return ""

    def _lost_race(self, what: str) -> NoReturn:
        """A write found the database changed under it in a way only another process could cause."""
        raise ReviewError(f"the review store changed during a write: {what}")

    def _sql(self, query: str) -> str:
        return query if self.PLACEHOLDER == "?" else query.replace("?", self.PLACEHOLDER)

    # -- loops ----------------------------------------------------------------------------------

    def _start_loop(self, flow: FlowDefinition, name: str, input_hash: str, checked: StartInput) -> Loop:
        def work(conn: C, changes: Changes) -> Loop:
            now = self._now()
            self._expire_in(conn, now, changes)
            inserted = conn.execute(
                self._sql(
                    "INSERT INTO loops (name, flow, task_type, status, input_json, input_hash, input_digest,"
                    " image_names, task_count, task_time_limit_s, created_at, expires_at, dicom_state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (name) DO NOTHING RETURNING seq"
                ),
                (
                    name,
                    flow.name,
                    str(flow.task_type),
                    str(LoopStatus.IN_PROGRESS),
                    checked.content_json,
                    input_hash,
                    checked.digest,
                    json.dumps(builtins.list(checked.images)),
                    flow.task_count,
                    flow.task_time_limit_s,
                    now,
                    now + flow.task_availability_lifetime_s,
                    initial_dicom_state(checked.images),
                ),
            ).fetchall()  # all rows: SQLite finishes a RETURNING statement only when it is read to the end
            if not inserted:
                row = conn.execute(self._sql("SELECT * FROM loops WHERE name = ?"), (name,)).fetchone()
                if row is None:  # deleted between our insert and this read: start again
                    self._lost_race("loop deleted concurrently")
                if row["input_digest"] != checked.digest:
                    raise AlreadyExists(f"human loop {name} already exists with a different input")
                return row_loop(row)
            if checked.images:
                cursor = conn.cursor()
                try:
                    cursor.executemany(
                        self._sql("INSERT INTO images (loop_seq, position, name, data) VALUES (?, ?, ?, ?)"),
                        [(inserted[0]["seq"], i, n, d) for i, (n, d) in enumerate(checked.images.items())],
                    )
                finally:
                    cursor.close()
            changes.work(flow.name, flow.task_count)
            return self._loop(conn, name)

        return self._write(work)

    def describe(self, name: str) -> Loop:
        self._sweep_if_due()
        return self._read(lambda conn: self._loop(conn, name))

    def images(self, name: str, *, with_dicom: bool = False) -> dict[str, bytes]:
        hidden = () if with_dicom else DICOM_ATTACHMENTS

        def read(conn: C) -> dict[str, bytes]:
            seq = self._loop_row(conn, name)["seq"]
            rows = conn.execute(
                self._sql("SELECT name, data FROM images WHERE loop_seq = ? AND name NOT IN (?, ?) ORDER BY position"),
                (seq, *(hidden or ("", ""))),
            ).fetchall()
            return {row["name"]: bytes(row["data"]) for row in rows}

        return self._read(read)

    def _list(self, query: ListQuery) -> tuple[builtins.list[Loop], str | None]:
        sql, params = query.sql(self.PLACEHOLDER)
        self._sweep_if_due()
        return query.page(self._read(lambda conn: conn.execute(sql, params).fetchall()))

    def stop(self, name: str) -> Loop:
        def work(conn: C, changes: Changes) -> Loop:
            now = self._now()
            self._expire_in(conn, now, changes)
            row = self._loop_row(conn, name, lock=True)
            loop = row_loop(row)
            if loop.status in (LoopStatus.COMPLETED, LoopStatus.FAILED):
                raise InvalidState(f"human loop {name} is {loop.status} and cannot be stopped")
            if loop.status is not LoopStatus.STOPPED:
                conn.execute(
                    self._sql("UPDATE loops SET status = ?, ended_at = ? WHERE seq = ?"),
                    (str(LoopStatus.STOPPED), now, row["seq"]),
                )
                changes.freed(self._cancel_leases(conn, now, [row["seq"]]))
                loop = self._loop(conn, name)
            return loop

        return self._write(work)

    def delete(self, name: str) -> None:
        def work(conn: C, changes: Changes) -> None:
            self._expire_in(conn, self._now(), changes)
            row = self._loop_row(conn, name, lock=True)
            status = parse_status(row["status"])
            if status in OPEN_STATUSES:
                raise InvalidState(f"human loop {name} is {status}; stop it before deleting it")
            conn.execute(self._sql("DELETE FROM loops WHERE seq = ?"), (row["seq"],))

        self._write(work)

    # -- delivery -------------------------------------------------------------------------------

    def renew(self, delivery_id: str, reviewer_id: str) -> Delivery:
        def work(conn: C, changes: Changes) -> Delivery:
            now = self._now()
            self._expire_in(conn, now, changes)
            row = self._own_delivery(conn, delivery_id, reviewer_id, "d.state, d.leased_at, l.*", lock=True)
            if row["state"] != "leased":
                raise InvalidState(f"delivery {delivery_id} is {row['state']}; only an open lease can be renewed")
            expires = min(now + row["task_time_limit_s"], row["expires_at"])
            conn.execute(self._sql("UPDATE deliveries SET lease_expires_at = ? WHERE id = ?"), (expires, delivery_id))
            return Delivery(delivery_id, reviewer_id, row_loop(row), row["leased_at"], expires)

        return self._write(work)

    def release(self, delivery_id: str, reviewer_id: str) -> None:
        def work(conn: C, changes: Changes) -> None:
            now = self._now()
            self._expire_in(conn, now, changes)
            row = self._own_delivery(conn, delivery_id, reviewer_id, "d.state, l.flow", lock=True)
            if row["state"] == "leased":
                conn.execute(
                    self._sql("UPDATE deliveries SET state = 'released', ended_at = ? WHERE id = ?"), (now, delivery_id)
                )
                changes.work(row["flow"])
                changes.freed([reviewer_id])

        self._write(work)

    def _submit(self, checked: SubmitInput) -> Decision:
        decision_id, reviewer_id, delivery_id = checked.decision_id, checked.reviewer_id, checked.delivery_id

        def work(conn: C, changes: Changes) -> Decision:
            now = self._now()
            self._expire_in(conn, now, changes)
            name = checked.loop_name
            accepted_at: float | None = None
            if delivery_id is not None:
                row = self._own_delivery(conn, delivery_id, reviewer_id, "d.leased_at, l.name", lock=False)
                if name is not None and name != row["name"]:
                    raise InvalidArgument(f"delivery {delivery_id} is not for human loop {name}")
                name, accepted_at = row["name"], row["leased_at"]
            if name is None:  # unreachable: checked above; narrows the type
                raise InvalidArgument("submit needs a delivery_id or a loop_name")
            # The loop's row lock orders the answers to one loop, across PostgreSQL replicas.
            loop_row = self._loop_row(conn, name, lock=True)
            payload = self._decision_digest(name, reviewer_id, checked.answer)
            existing = conn.execute(self._sql("SELECT * FROM decisions WHERE id = ?"), (decision_id,)).fetchone()
            if existing is not None:
                if existing["payload_digest"] != payload:
                    raise AlreadyExists(f"decision {decision_id} was already recorded with a different payload")
                return row_decision(existing, name, parse_status(loop_row["status"]), replayed=True)
            loop = row_loop(loop_row)
            if loop.status is not LoopStatus.IN_PROGRESS:
                raise InvalidState(f"human loop {name} is {loop.status}; it takes no more answers")
            previous = conn.execute(
                self._sql("SELECT id FROM decisions WHERE loop_seq = ? AND reviewer = ?"),
                (loop_row["seq"], reviewer_id),
            ).fetchone()
            if previous is not None:
                raise AlreadyExists(f"reviewer {reviewer_id} already answered human loop {name}")
            if accepted_at is None:
                lease_row = one(
                    conn.execute(
                        self._sql("SELECT MAX(leased_at) AS t FROM deliveries WHERE loop_seq = ? AND reviewer = ?"),
                        (loop_row["seq"], reviewer_id),
                    )
                )
                accepted_at = now if lease_row["t"] is None else float(lease_row["t"])
            conn.execute(
                self._sql(
                    "INSERT INTO decisions (id, loop_seq, reviewer, delivery_id, answer_json, payload_digest,"
                    " accepted_at, submitted_at, reviewer_issuer, reviewer_subject)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (
                    decision_id,
                    loop_row["seq"],
                    reviewer_id,
                    delivery_id,
                    checked.answer_json,
                    payload,
                    accepted_at,
                    now,
                    checked.issuer,
                    checked.subject,
                ),
            )
            conn.execute(
                self._sql(
                    "UPDATE deliveries SET state = 'answered', ended_at = ?"
                    " WHERE loop_seq = ? AND reviewer = ? AND (state = 'leased' OR id = ?)"
                ),
                (now, loop_row["seq"], reviewer_id, delivery_id),
            )
            changes.freed([reviewer_id])
            answers = loop.answers + 1
            status = LoopStatus.COMPLETED if answers >= loop.task_count else LoopStatus.IN_PROGRESS
            conn.execute(
                self._sql("UPDATE loops SET answers = ?, status = ?, ended_at = ? WHERE seq = ?"),
                (answers, str(status), now if status is LoopStatus.COMPLETED else None, loop_row["seq"]),
            )
            if status is LoopStatus.COMPLETED:
                changes.freed(self._cancel_leases(conn, now, [loop_row["seq"]]))
            return Decision(
                decision_id,
                name,
                reviewer_id,
                delivery_id,
                json.loads(checked.answer_json),
                accepted_at,
                now,
                status,
                issuer=checked.issuer,
                subject=checked.subject,
            )

        return self._write(work)

    def decisions(self, name: str) -> builtins.list[Decision]:
        def read(conn: C) -> builtins.list[Decision]:
            row = self._loop_row(conn, name)
            rows = conn.execute(
                self._sql("SELECT * FROM decisions WHERE loop_seq = ? ORDER BY submitted_at, id"), (row["seq"],)
            ).fetchall()
            return [row_decision(r, name, parse_status(row["status"])) for r in rows]

        return self._read(read)

    def expire(self) -> ExpiryReport:
        def work(conn: C, changes: Changes) -> ExpiryReport:
            failed, requeued = self._expire_in(conn, self._now(), changes)
            return ExpiryReport(tuple(failed), requeued)

        return self._write(work)

    def queue_depth(self, flow: str | None = None) -> int:
        now = self._now()
        flow_filter = "" if flow is None else " AND l.flow = ?"
        query = self._sql(
            f"SELECT COALESCE(SUM({self.GREATEST}(0, l.task_count - l.answers - (SELECT COUNT(*) FROM deliveries AS d"
            "   WHERE d.loop_seq = l.seq AND d.state = 'leased' AND d.lease_expires_at > ?))), 0) AS n"
            f" FROM loops AS l WHERE l.status = 'InProgress' AND l.expires_at > ?{flow_filter}"
        )
        row = self._read(lambda conn: one(conn.execute(query, (now, now) if flow is None else (now, now, flow))))
        return int(row["n"])

    def loop_of_delivery(self, delivery_id: str) -> Loop:
        row = self._read(
            lambda conn: conn.execute(
                self._sql("SELECT l.* FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq WHERE d.id = ?"),
                (delivery_id,),
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"delivery {delivery_id} not found")
        return row_loop(row)

    def open_deliveries(self, reviewer_id: str) -> builtins.list[Delivery]:
        now = self._now()
        rows = self._read(
            lambda conn: conn.execute(
                self._sql(
                    "SELECT d.id AS delivery_id, d.leased_at, d.lease_expires_at, l.* FROM deliveries AS d"
                    " JOIN loops AS l ON l.seq = d.loop_seq WHERE d.reviewer = ? AND d.state = 'leased'"
                    " AND d.lease_expires_at > ? AND l.status = 'InProgress' ORDER BY d.leased_at, l.seq"
                ),
                (reviewer_id, now),
            ).fetchall()
        )
        return [
            Delivery(row["delivery_id"], reviewer_id, row_loop(row), row["leased_at"], row["lease_expires_at"])
            for row in rows
        ]

    def in_flight(self, reviewer_id: str) -> int:
        row = self._read(lambda conn: one(self._count_leases(conn, reviewer_id)))
        return int(row["n"])

    def _count_leases(self, conn: C, reviewer_id: str) -> Cursor:
        """The reviewer's open leases, as column ``n``."""
        return conn.execute(
            self._sql("SELECT COUNT(*) AS n FROM deliveries WHERE reviewer = ? AND state = 'leased'"), (reviewer_id,)
        )

    # -- output bookkeeping ---------------------------------------------------------------------

    def pending_outputs(self, flow: str | None = None) -> builtins.list[Loop]:
        flow_filter = "" if flow is None else " AND flow = ?"
        query = self._sql(
            f"SELECT * FROM loops WHERE status = 'Completed' AND output_path IS NULL{flow_filter} ORDER BY seq"
        )
        rows = self._read(lambda conn: conn.execute(query, () if flow is None else (flow,)).fetchall())
        return [row_loop(row) for row in rows]

    def mark_output(self, name: str, output_path: str) -> None:
        def work(conn: C, changes: Changes) -> None:
            updated = conn.execute(self._sql("UPDATE loops SET output_path = ? WHERE name = ?"), (output_path, name))
            if updated.rowcount == 0:
                raise NotFound(f"human loop {name} not found")

        self._write(work)

    def pending_dicom(self, limit: int = MAX_LIST_RESULTS) -> builtins.list[Loop]:
        rows = self._read(
            lambda conn: conn.execute(
                self._sql(
                    "SELECT * FROM loops WHERE dicom_state = 'pending' AND status IN ('Completed', 'Failed', 'Stopped')"
                    " ORDER BY seq LIMIT ?"
                ),
                (limit,),
            ).fetchall()
        )
        return [row_loop(row) for row in rows]

    def mark_dicom(self, name: str, state: str, note: str = "", *, drop_source: bool = False) -> None:
        def work(conn: C, changes: Changes) -> None:
            rows = conn.execute(
                self._sql("UPDATE loops SET dicom_state = ?, dicom_note = ? WHERE name = ? RETURNING seq"),
                (state, note, name),
            ).fetchall()
            if not rows:
                raise NotFound(f"human loop {name} not found")
            if drop_source:
                conn.execute(
                    self._sql("DELETE FROM images WHERE loop_seq = ? AND name IN (?, ?)"),
                    (rows[0]["seq"], *DICOM_ATTACHMENTS),
                )

        self._write(work)

    def dicom_state(self, name: str) -> tuple[str | None, str | None]:
        row = self._read(lambda conn: self._loop_row(conn, name))
        return row["dicom_state"], row["dicom_note"]

    # -- internals ------------------------------------------------------------------------------

    def _sweep_if_due(self) -> None:
        """Expire overdue loops before a read, so Describe and List never show an expired loop InProgress."""
        query = self._sql("SELECT 1 FROM loops WHERE status = 'InProgress' AND expires_at <= ? LIMIT 1")
        due = self._read(lambda conn: conn.execute(query, (self._now(),)).fetchone())
        if due is not None:
            self.expire()

    def _loop_row(self, conn: C, name: str, *, lock: bool = False) -> Any:
        query = self._sql("SELECT * FROM loops WHERE name = ?") + (self._for_update() if lock else "")
        row = conn.execute(query, (name,)).fetchone()
        if row is None:
            raise NotFound(f"human loop {name} not found")
        return row

    def _own_delivery(self, conn: C, delivery_id: str, reviewer_id: str, columns: str, *, lock: bool) -> Any:
        """A delivery's ``reviewer`` and ``columns`` (of deliveries ``d`` and loops ``l``), when it is the reviewer's.

        :class:`NotFound` for an unknown delivery, :class:`NotYourLease` for another reviewer's; ``lock``: its row is
        locked until the transaction ends."""
        row = conn.execute(
            self._sql(
                f"SELECT d.reviewer, {columns} FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq"
                " WHERE d.id = ?"
            )
            + (self._for_update("d") if lock else ""),
            (delivery_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"delivery {delivery_id} not found")
        if row["reviewer"] != reviewer_id:
            raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
        return row

    def _loop(self, conn: C, name: str) -> Loop:
        return row_loop(self._loop_row(conn, name))
