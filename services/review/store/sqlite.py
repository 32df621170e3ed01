"""The SQLite review store: one file in WAL mode with synchronous=FULL, owned by one process."""

from __future__ import annotations

import builtins
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, TypeVar

from services.review.flows import ReviewError
from services.review.store.base import Changes
from services.review.store.model import FAILURE_EXPIRED, Delivery, LeaseBatch, LoopStatus
from services.review.store.schema import migrate, row_loop
from services.review.store.sql import SqlReviewStore, one

T = TypeVar("T")

logger = logging.getLogger("medgate.review.store")


class ReviewStore(SqlReviewStore[sqlite3.Connection]):
    """Human loops, deliveries and decisions in one SQLite file; thread-safe; ``now`` is injectable.

    The semantics are :class:`~services.review.store.base.ReviewStoreBase`'s, most of the statements
    :class:`~services.review.store.sql.SqlReviewStore`'s. One process owns a database file (the connection is
    shared by threads under a lock); several review replicas need the PostgreSQL store instead
    (:mod:`services.review.store.postgres`). Work events are published to this process's listeners only.
    """

    PLACEHOLDER: ClassVar[str] = "?"
    GREATEST: ClassVar[str] = "MAX"

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

    def _write(self, work: Callable[[sqlite3.Connection, Changes], T]) -> T:
        with self._transaction() as (conn, changes):
            result = work(conn, changes)
        return result

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._reading() as conn:
            return work(conn)

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
            in_flight = int(one(self._count_leases(conn, reviewer_id))["n"])
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

    # -- internals ------------------------------------------------------------------------------

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
            changes.freed(self._cancel_leases(conn, now, ()))
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

    def _cancel_leases(self, conn: sqlite3.Connection, now: float, loop_seqs: Iterable[int]) -> builtins.list[str]:
        """Close open leases on every loop that takes no more answers (``loop_seqs`` are among them: writes run
        one at a time, so no other loop has any); the reviewers who held them."""
        rows = conn.execute(
            "UPDATE deliveries SET state = 'cancelled', ended_at = ? WHERE state = 'leased'"
            " AND loop_seq IN (SELECT seq FROM loops WHERE status != 'InProgress') RETURNING reviewer",
            (now,),
        ).fetchall()
        return [row["reviewer"] for row in rows]
