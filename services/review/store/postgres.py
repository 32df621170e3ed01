"""The PostgreSQL review store: several review replicas on one database, leases taken with SKIP LOCKED, LISTEN/NOTIFY.

The semantics are :class:`ReviewStoreBase`'s, as the SQLite store's, with these differences that come
from sharing the database between processes:

* A store opened on the database does not take over the leases it finds: other replicas may be serving
  them. A reviewer that reconnects to any replica gets its open leases again; the rest expire.
* Leases: a reviewer's lease calls run one at a time across replicas (a transaction-level advisory
  lock on the reviewer), and open loops are locked with ``FOR UPDATE SKIP LOCKED`` so concurrent
  reviewers take different cases instead of queueing behind each other. A loop's open leases are
  counted again after its row is locked: a lease committed since the query's snapshot is then seen.
* Work events go out with ``pg_notify`` in the committing transaction (so only committed work is
  announced) and come back to every replica's listener thread; a store ignores its own, which it
  published locally as soon as it committed.
* Transactions that lose a race (deadlock, serialization failure, a unique key taken meanwhile, a
  connection dropped) are run again, a few times, from the start. Every write is idempotent or
  re-checks what it depends on, so running one again is safe.
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from services.review.flows import FlowDefinition, InvalidArgument, ReviewError
from services.review.store.base import Changes, ReviewStoreBase
from services.review.store.model import (
    ALL_REVIEWERS,
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
    StoreUnavailable,
    WorkEvent,
    initial_dicom_state,
    parse_status,
)
from services.review.store.postgres_schema import migrate
from services.review.store.schema import row_decision, row_loop

logger = logging.getLogger("medgate.review.store")

T = TypeVar("T")
Connection = psycopg.Connection[dict[str, Any]]

# One channel per database; replicas of one deployment share it.
CHANNEL = "medgate_review"
# pg_notify refuses payloads of 8000 bytes or more; past this, the reviewers' names become ALL_REVIEWERS.
MAX_PAYLOAD_BYTES = 7900
# A transaction that lost a race runs again this many times at most (then the error reaches the caller).
ATTEMPTS = 5
# Rounds of SKIP LOCKED leasing when a locked loop turned out to be full already (another lease was
# committed after this statement's snapshot); each round takes a fresh snapshot.
LEASE_ROUNDS = 3
# When every eligible loop was locked by others, wait this long for the first one instead of leaving
# empty-handed: a task_count 2 loop locked by another reviewer's lease may still have room for this one.
LEASE_LOCK_WAIT = "2s"
# Prefix of a reviewer's advisory lock key, so it cannot collide with another use of advisory locks.
REVIEWER_LOCK_PREFIX = "medgate-review-reviewer:"

# Errors after which the whole transaction is run again: lost races and dropped connections
# (psycopg's OperationalError covers deadlocks, serialization failures, lock timeouts and broken
# connections; a unique key taken by a concurrent transaction is an IntegrityError).
RETRYABLE: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.errors.UniqueViolation)

LOOP_CANDIDATES = (
    "SELECT l.* FROM loops AS l WHERE l.status = 'InProgress' AND l.flow = ANY(%(flows)s) AND l.expires_at > %(now)s"
    " AND l.answers + (SELECT count(*) FROM deliveries AS d WHERE d.loop_seq = l.seq AND d.state = 'leased')"
    "   < l.task_count"
    " AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.loop_seq = l.seq"
    "   AND d.reviewer = %(reviewer)s AND d.state IN ('leased', 'released'))"
    " AND NOT EXISTS (SELECT 1 FROM decisions AS x WHERE x.loop_seq = l.seq AND x.reviewer = %(reviewer)s)"
)


def one(cursor: psycopg.Cursor[dict[str, Any]]) -> dict[str, Any]:
    """The row of a query that always has exactly one (an aggregate, EXISTS)."""
    row = cursor.fetchone()
    if row is None:
        raise ReviewError("the database answered an aggregate query without a row")
    return row


def redacted(url: str) -> str:
    """A connection URL fit for logs and messages: host, port and database, never a password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql://{host}:{port}/{parts.get('dbname') or ''}"


class PostgresReviewStore(ReviewStoreBase):
    """Human loops, deliveries and decisions in PostgreSQL; thread-safe; ``now`` is injectable.

    ``url``: a libpq URL or key/value string (``postgresql://user@host:5432/medgate``); a password is
    better kept in ``PGPASSFILE`` or ``PGPASSWORD`` than in the URL. ``pool_size``: connections at
    most (the review server's store threads, plus housekeeping). ``listen``: receive other replicas'
    work events (a server does; a command-line export does not need to). ``pool_timeout_s``: how long
    a call waits for a connection (the database down: then it fails, and the pool keeps reconnecting).
    """

    def __init__(
        self,
        url: str,
        *,
        now: Callable[[], float] = time.time,
        pool_size: int = 6,
        listen: bool = True,
        connect_timeout_s: float = 10.0,
        pool_timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self.label = redacted(url)
        self._url = url
        self._now = now
        self._origin = uuid.uuid4().hex[:16]
        self._closed = False
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            connection_class=Connection,
            min_size=1,
            max_size=max(2, pool_size),
            kwargs={"autocommit": True, "row_factory": dict_row},
            name="medgate-review",
            timeout=pool_timeout_s,
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:
            self._pool.close()
            raise ReviewError(f"{self.label}: cannot connect ({type(exc).__name__})") from None
        self._closing = threading.Event()
        self._listening = threading.Event()
        self._listener: threading.Thread | None = None
        try:
            with self._pool.connection() as conn:
                migrate(conn, self.label)
            if listen:
                self._listener = threading.Thread(target=self._listen, name="medgate-review-listen", daemon=True)
                self._listener.start()
                if not self._listening.wait(connect_timeout_s):
                    raise ReviewError(f"{self.label}: the notification listener did not connect")
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._pool.close()

    def __enter__(self) -> PostgresReviewStore:
        return self

    # -- transactions and notifications -------------------------------------------------------------

    def _write(self, work: Callable[[Connection, Changes], T]) -> T:
        """Run ``work`` in one transaction, again from the start if it lost a race; publish its events."""
        if self._closed:
            raise ReviewError("the review store is closed")
        for attempt in range(ATTEMPTS):
            changes = Changes()
            try:
                with self._pool.connection() as conn, conn.transaction():
                    result = work(conn, changes)
                    event = changes.event()
                    if event:
                        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._payload(event)))
            except PoolTimeout:
                # No connection within pool_timeout_s: the database is away, trying again only waits longer.
                raise StoreUnavailable("the review store's database cannot be reached") from None
            except RETRYABLE as exc:
                if attempt == ATTEMPTS - 1:
                    if isinstance(exc, psycopg.OperationalError):
                        raise StoreUnavailable("the review store's database did not complete the transaction") from None
                    raise
                logger.debug("review store transaction runs again after %s", type(exc).__name__)
                self._after_failure(exc)
                time.sleep(random.uniform(0.001, 0.01) * (attempt + 1))
                continue
            self._publish(event)
            return result
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[Connection], T]) -> T:
        if self._closed:
            raise ReviewError("the review store is closed")
        for attempt in range(ATTEMPTS):
            try:
                with self._pool.connection() as conn:
                    return work(conn)
            except PoolTimeout:
                raise StoreUnavailable("the review store's database cannot be reached") from None
            except psycopg.OperationalError as exc:
                if attempt == ATTEMPTS - 1:
                    raise StoreUnavailable("the review store's database did not answer") from None
                self._after_failure(exc)
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _after_failure(self, exc: BaseException) -> None:
        """After a dropped connection (a database restart drops them all), weed out the pool's dead ones
        before trying again, rather than meeting them one attempt at a time."""
        lost_race = psycopg.errors.TransactionRollback | psycopg.errors.LockNotAvailable
        if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, lost_race):
            self._pool.check()

    def _payload(self, event: WorkEvent) -> str:
        reviewers = sorted(event.reviewers)
        payload = json.dumps({"o": self._origin, "f": dict(event.flows), "r": reviewers}, separators=(",", ":"))
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            payload = json.dumps(
                {"o": self._origin, "f": dict(event.flows), "r": [ALL_REVIEWERS]}, separators=(",", ":")
            )
        return payload

    def _received(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            if data.get("o") == self._origin:
                return  # ours: published when we committed
            flows = {str(k): int(v) for k, v in dict(data.get("f") or {}).items()}
            event = WorkEvent(flows, frozenset(str(r) for r in data.get("r") or ()))
        except (ValueError, TypeError, AttributeError):
            logger.warning("ignored a malformed review notification")
            return
        self._publish(event)

    def _listen(self) -> None:
        """LISTEN on its own connection; after a reconnect every waiter looks again (notes may be lost)."""
        backoff = 0.5
        connected_before = False
        while not self._closing.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    if connected_before:
                        logger.info("%s: notification listener reconnected", self.label)
                        self._publish(WorkEvent(everything=True))
                    connected_before = True
                    backoff = 0.5
                    while not self._closing.is_set():
                        for note in conn.notifies(timeout=0.1):  # also how soon close() is noticed
                            self._received(note.payload)
            except psycopg.Error as exc:
                if self._closing.is_set():
                    return
                logger.warning("%s: notification listener lost (%s); retrying", self.label, type(exc).__name__)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # -- waiting for work ---------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        row = self._read(
            lambda conn: conn.execute(
                "SELECT LEAST((SELECT MIN(lease_expires_at) FROM deliveries WHERE state = 'leased'),"
                " (SELECT MIN(expires_at) FROM loops WHERE status = 'InProgress')) AS t"
            ).fetchone()
        )
        return None if row is None or row["t"] is None else float(row["t"])

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
        checked = self._checked_start(flow, name, input_content, input_hash, images)

        def work(conn: Connection, changes: Changes) -> Loop:
            now = self._now()
            self._expire_in(conn, now, changes)
            inserted = conn.execute(
                "INSERT INTO loops (name, flow, task_type, status, input_json, input_hash, input_digest,"
                " image_names, task_count, task_time_limit_s, created_at, expires_at, dicom_state)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING RETURNING seq",
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
            ).fetchone()
            if inserted is None:
                row = conn.execute("SELECT * FROM loops WHERE name = %s", (name,)).fetchone()
                if row is None:  # deleted between our insert and this read: start again
                    raise psycopg.errors.SerializationFailure("loop deleted concurrently")
                if row["input_digest"] != checked.digest:
                    raise AlreadyExists(f"human loop {name} already exists with a different input")
                return row_loop(row)
            if checked.images:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO images (loop_seq, position, name, data) VALUES (%s, %s, %s, %s)",
                        [(inserted["seq"], i, n, d) for i, (n, d) in enumerate(checked.images.items())],
                    )
            changes.work(flow.name, flow.task_count)
            return self._loop(conn, name)

        return self._write(work)

    def describe(self, name: str) -> Loop:
        self._sweep_if_due()
        return self._read(lambda conn: self._loop(conn, name))

    def images(self, name: str, *, with_dicom: bool = False) -> dict[str, bytes]:
        hidden = () if with_dicom else DICOM_ATTACHMENTS

        def read(conn: Connection) -> dict[str, bytes]:
            seq = self._loop_row(conn, name)["seq"]
            rows = conn.execute(
                "SELECT name, data FROM images WHERE loop_seq = %s AND name NOT IN (%s, %s) ORDER BY position",
                (seq, *(hidden or ("", ""))),
            )
            return {row["name"]: bytes(row["data"]) for row in rows}

        return self._read(read)

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
        query = self._list_query(flow, status, created_after, created_before, ascending, max_results, next_token)
        sql, params = query.sql("%s")
        self._sweep_if_due()
        return query.page(self._read(lambda conn: conn.execute(sql, params).fetchall()))

    def stop(self, name: str) -> Loop:
        def work(conn: Connection, changes: Changes) -> Loop:
            now = self._now()
            self._expire_in(conn, now, changes)
            row = self._loop_row(conn, name, lock=True)
            loop = row_loop(row)
            if loop.status in (LoopStatus.COMPLETED, LoopStatus.FAILED):
                raise InvalidState(f"human loop {name} is {loop.status} and cannot be stopped")
            if loop.status is not LoopStatus.STOPPED:
                conn.execute(
                    "UPDATE loops SET status = %s, ended_at = %s WHERE seq = %s",
                    (str(LoopStatus.STOPPED), now, row["seq"]),
                )
                changes.freed(self._cancel_leases(conn, now, [row["seq"]]))
                loop = self._loop(conn, name)
            return loop

        return self._write(work)

    def delete(self, name: str) -> None:
        def work(conn: Connection, changes: Changes) -> None:
            self._expire_in(conn, self._now(), changes)
            row = self._loop_row(conn, name, lock=True)
            status = parse_status(row["status"])
            if status in OPEN_STATUSES:
                raise InvalidState(f"human loop {name} is {status}; stop it before deleting it")
            conn.execute("DELETE FROM loops WHERE seq = %s", (row["seq"],))

        self._write(work)

    # -- delivery -------------------------------------------------------------------------------

    def lease_batch(
        self, reviewer_id: str, flows: Sequence[str], *, max_in_flight: int = 1, count: int = 1
    ) -> LeaseBatch:
        flow_names = self._checked_lease(reviewer_id, flows, max_in_flight, count)

        def work(conn: Connection, changes: Changes) -> LeaseBatch:
            now = self._now()
            # One reviewer's lease calls one at a time, whichever replica serves them: max_in_flight holds.
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (REVIEWER_LOCK_PREFIX + reviewer_id,))
            self._expire_in(conn, now, changes)
            in_flight = int(
                one(
                    conn.execute(
                        "SELECT count(*) AS n FROM deliveries WHERE reviewer = %s AND state = 'leased'", (reviewer_id,)
                    )
                )["n"]
            )
            room = min(count, max_in_flight - in_flight)
            params = {"flows": flow_names, "now": now, "reviewer": reviewer_id}
            deliveries: builtins.list[Delivery] = []
            for _ in range(LEASE_ROUNDS):
                if len(deliveries) >= room:
                    break
                rows = conn.execute(
                    f"{LOOP_CANDIDATES} ORDER BY l.seq LIMIT %(limit)s FOR UPDATE OF l SKIP LOCKED",
                    {**params, "limit": room - len(deliveries)},
                ).fetchall()
                taken = self._take(conn, reviewer_id, rows, now)
                deliveries += taken
                if len(taken) == len(rows):
                    break
            if room > 0 and not deliveries:
                deliveries = self._take_locked(conn, reviewer_id, params, now)
            return LeaseBatch(tuple(deliveries), max(0, max_in_flight - in_flight - len(deliveries)))

        return self._write(work)

    def _take(
        self, conn: Connection, reviewer_id: str, rows: builtins.list[dict[str, Any]], now: float
    ) -> builtins.list[Delivery]:
        """Lease the loops whose rows this transaction has locked, if they still have room.

        The candidate query counted open leases in its snapshot; one committed since then (by the
        transaction that held the row lock before us) is seen by this fresh statement.
        """
        if not rows:
            return []
        counted = conn.execute(
            "SELECT loop_seq, count(*) AS n FROM deliveries WHERE loop_seq = ANY(%s) AND state = 'leased'"
            " GROUP BY loop_seq",
            ([row["seq"] for row in rows],),
        ).fetchall()
        open_leases = {row["loop_seq"]: int(row["n"]) for row in counted}
        taken: builtins.list[Delivery] = []
        inserts: builtins.list[tuple[Any, ...]] = []
        for row in rows:
            if row["answers"] + open_leases.get(row["seq"], 0) >= row["task_count"]:
                continue
            delivery_id = uuid.uuid4().hex
            expires = min(now + row["task_time_limit_s"], row["expires_at"])
            taken.append(Delivery(delivery_id, reviewer_id, row_loop(row), now, expires))
            inserts.append((delivery_id, row["seq"], reviewer_id, now, expires))
        if inserts:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO deliveries (id, loop_seq, reviewer, state, leased_at, lease_expires_at)"
                    " VALUES (%s, %s, %s, 'leased', %s, %s)",
                    inserts,
                )
        return taken

    def _take_locked(
        self, conn: Connection, reviewer_id: str, params: dict[str, Any], now: float
    ) -> builtins.list[Delivery]:
        """Everything eligible was locked by others: wait (briefly) for the oldest such loop.

        Its holder may be another reviewer leasing a task_count 2 loop that has room for us too, or a
        decision that leaves it open; leaving empty-handed would strand the case until the next event.
        """
        waiting = conn.execute(f"{LOOP_CANDIDATES} ORDER BY l.seq LIMIT 1", params).fetchone()
        if waiting is None:
            return []
        try:
            with conn.transaction():  # a savepoint: a lock timeout undoes only this wait
                conn.execute(f"SET LOCAL lock_timeout = '{LEASE_LOCK_WAIT}'")
                conn.execute("SELECT seq FROM loops WHERE seq = %s FOR UPDATE", (waiting["seq"],))
                rows = conn.execute(f"{LOOP_CANDIDATES} AND l.seq = %(seq)s", {**params, "seq": waiting["seq"]})
                return self._take(conn, reviewer_id, rows.fetchall(), now)
        except psycopg.errors.LockNotAvailable:
            return []

    def renew(self, delivery_id: str, reviewer_id: str) -> Delivery:
        def work(conn: Connection, changes: Changes) -> Delivery:
            now = self._now()
            self._expire_in(conn, now, changes)
            row = conn.execute(
                "SELECT d.reviewer, d.state, d.leased_at, l.* FROM deliveries AS d"
                " JOIN loops AS l ON l.seq = d.loop_seq WHERE d.id = %s FOR UPDATE OF d",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"delivery {delivery_id} not found")
            if row["reviewer"] != reviewer_id:
                raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
            if row["state"] != "leased":
                raise InvalidState(f"delivery {delivery_id} is {row['state']}; only an open lease can be renewed")
            expires = min(now + row["task_time_limit_s"], row["expires_at"])
            conn.execute("UPDATE deliveries SET lease_expires_at = %s WHERE id = %s", (expires, delivery_id))
            return Delivery(delivery_id, reviewer_id, row_loop(row), row["leased_at"], expires)

        return self._write(work)

    def release(self, delivery_id: str, reviewer_id: str) -> None:
        def work(conn: Connection, changes: Changes) -> None:
            now = self._now()
            self._expire_in(conn, now, changes)
            row = conn.execute(
                "SELECT d.reviewer, d.state, l.flow FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq"
                " WHERE d.id = %s FOR UPDATE OF d",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"delivery {delivery_id} not found")
            if row["reviewer"] != reviewer_id:
                raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
            if row["state"] == "leased":
                conn.execute(
                    "UPDATE deliveries SET state = 'released', ended_at = %s WHERE id = %s", (now, delivery_id)
                )
                changes.work(row["flow"])
                changes.freed([reviewer_id])

        self._write(work)

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
        answer_json = self._checked_submit(decision_id, reviewer_id, answer, delivery_id, loop_name, issuer, subject)

        def work(conn: Connection, changes: Changes) -> Decision:
            now = self._now()
            self._expire_in(conn, now, changes)
            name = loop_name
            accepted_at: float | None = None
            if delivery_id is not None:
                row = conn.execute(
                    "SELECT d.reviewer, d.leased_at, l.name FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq"
                    " WHERE d.id = %s",
                    (delivery_id,),
                ).fetchone()
                if row is None:
                    raise NotFound(f"delivery {delivery_id} not found")
                if row["reviewer"] != reviewer_id:
                    raise NotYourLease(f"delivery {delivery_id} is leased to another reviewer")
                if name is not None and name != row["name"]:
                    raise InvalidArgument(f"delivery {delivery_id} is not for human loop {name}")
                name, accepted_at = row["name"], row["leased_at"]
            if name is None:  # unreachable: checked above; narrows the type
                raise InvalidArgument("submit needs a delivery_id or a loop_name")
            # The loop's row lock orders the answers to one loop, across replicas.
            loop_row = self._loop_row(conn, name, lock=True)
            payload = self._decision_digest(name, reviewer_id, answer)
            existing = conn.execute("SELECT * FROM decisions WHERE id = %s", (decision_id,)).fetchone()
            if existing is not None:
                if existing["payload_digest"] != payload:
                    raise AlreadyExists(f"decision {decision_id} was already recorded with a different payload")
                return row_decision(existing, name, parse_status(loop_row["status"]), replayed=True)
            loop = row_loop(loop_row)
            if loop.status is not LoopStatus.IN_PROGRESS:
                raise InvalidState(f"human loop {name} is {loop.status}; it takes no more answers")
            previous = conn.execute(
                "SELECT id FROM decisions WHERE loop_seq = %s AND reviewer = %s", (loop_row["seq"], reviewer_id)
            ).fetchone()
            if previous is not None:
                raise AlreadyExists(f"reviewer {reviewer_id} already answered human loop {name}")
            if accepted_at is None:
                lease_row = one(
                    conn.execute(
                        "SELECT MAX(leased_at) AS t FROM deliveries WHERE loop_seq = %s AND reviewer = %s",
                        (loop_row["seq"], reviewer_id),
                    )
                )
                accepted_at = now if lease_row["t"] is None else float(lease_row["t"])
            conn.execute(
                "INSERT INTO decisions (id, loop_seq, reviewer, delivery_id, answer_json, payload_digest,"
                " accepted_at, submitted_at, reviewer_issuer, reviewer_subject)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
                "UPDATE deliveries SET state = 'answered', ended_at = %s"
                " WHERE loop_seq = %s AND reviewer = %s AND (state = 'leased' OR id = %s)",
                (now, loop_row["seq"], reviewer_id, delivery_id),
            )
            changes.freed([reviewer_id])
            answers = loop.answers + 1
            status = LoopStatus.COMPLETED if answers >= loop.task_count else LoopStatus.IN_PROGRESS
            conn.execute(
                "UPDATE loops SET answers = %s, status = %s, ended_at = %s WHERE seq = %s",
                (answers, str(status), now if status is LoopStatus.COMPLETED else None, loop_row["seq"]),
            )
            if status is LoopStatus.COMPLETED:
                changes.freed(self._cancel_leases(conn, now, [loop_row["seq"]]))
            return Decision(
                decision_id,
                name,
                reviewer_id,
                delivery_id,
                json.loads(answer_json),
                accepted_at,
                now,
                status,
                issuer=issuer,
                subject=subject,
            )

        return self._write(work)

    def decisions(self, name: str) -> builtins.list[Decision]:
        def read(conn: Connection) -> builtins.list[Decision]:
            row = self._loop_row(conn, name)
            rows = conn.execute(
                "SELECT * FROM decisions WHERE loop_seq = %s ORDER BY submitted_at, id", (row["seq"],)
            ).fetchall()
            return [row_decision(r, name, parse_status(row["status"])) for r in rows]

        return self._read(read)

    def expire(self) -> ExpiryReport:
        def work(conn: Connection, changes: Changes) -> ExpiryReport:
            failed, requeued = self._expire_in(conn, self._now(), changes)
            return ExpiryReport(tuple(failed), requeued)

        return self._write(work)

    def queue_depth(self, flow: str | None = None) -> int:
        now = self._now()
        flow_filter = "" if flow is None else " AND l.flow = %s"
        row = self._read(
            lambda conn: one(
                conn.execute(
                    "SELECT COALESCE(SUM(GREATEST(0, l.task_count - l.answers - (SELECT count(*) FROM deliveries AS d"
                    "   WHERE d.loop_seq = l.seq AND d.state = 'leased' AND d.lease_expires_at > %s))), 0) AS n"
                    f" FROM loops AS l WHERE l.status = 'InProgress' AND l.expires_at > %s{flow_filter}",
                    (now, now) if flow is None else (now, now, flow),
                )
            )
        )
        return int(row["n"])

    def loop_of_delivery(self, delivery_id: str) -> Loop:
        row = self._read(
            lambda conn: conn.execute(
                "SELECT l.* FROM deliveries AS d JOIN loops AS l ON l.seq = d.loop_seq WHERE d.id = %s", (delivery_id,)
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"delivery {delivery_id} not found")
        return row_loop(row)

    def open_deliveries(self, reviewer_id: str) -> builtins.list[Delivery]:
        now = self._now()
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT d.id AS delivery_id, d.leased_at, d.lease_expires_at, l.* FROM deliveries AS d"
                " JOIN loops AS l ON l.seq = d.loop_seq WHERE d.reviewer = %s AND d.state = 'leased'"
                " AND d.lease_expires_at > %s AND l.status = 'InProgress' ORDER BY d.leased_at, l.seq",
                (reviewer_id, now),
            ).fetchall()
        )
        return [
            Delivery(row["delivery_id"], reviewer_id, row_loop(row), row["leased_at"], row["lease_expires_at"])
            for row in rows
        ]

    def in_flight(self, reviewer_id: str) -> int:
        row = self._read(
            lambda conn: one(
                conn.execute(
                    "SELECT count(*) AS n FROM deliveries WHERE reviewer = %s AND state = 'leased'", (reviewer_id,)
                )
            )
        )
        return int(row["n"])

    # -- output bookkeeping ---------------------------------------------------------------------

    def pending_outputs(self, flow: str | None = None) -> builtins.list[Loop]:
        flow_filter = "" if flow is None else " AND flow = %s"
        rows = self._read(
            lambda conn: conn.execute(
                f"SELECT * FROM loops WHERE status = 'Completed' AND output_path IS NULL{flow_filter} ORDER BY seq",
                () if flow is None else (flow,),
            ).fetchall()
        )
        return [row_loop(row) for row in rows]

    def mark_output(self, name: str, output_path: str) -> None:
        def work(conn: Connection, changes: Changes) -> None:
            if conn.execute("UPDATE loops SET output_path = %s WHERE name = %s", (output_path, name)).rowcount == 0:
                raise NotFound(f"human loop {name} not found")

        self._write(work)

    def pending_dicom(self, limit: int = MAX_LIST_RESULTS) -> builtins.list[Loop]:
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT * FROM loops WHERE dicom_state = 'pending' AND status IN ('Completed', 'Failed', 'Stopped')"
                " ORDER BY seq LIMIT %s",
                (limit,),
            ).fetchall()
        )
        return [row_loop(row) for row in rows]

    def mark_dicom(self, name: str, state: str, note: str = "", *, drop_source: bool = False) -> None:
        def work(conn: Connection, changes: Changes) -> None:
            row = conn.execute(
                "UPDATE loops SET dicom_state = %s, dicom_note = %s WHERE name = %s RETURNING seq", (state, note, name)
            ).fetchone()
            if row is None:
                raise NotFound(f"human loop {name} not found")
            if drop_source:
                conn.execute(
                    "DELETE FROM images WHERE loop_seq = %s AND name IN (%s, %s)", (row["seq"], *DICOM_ATTACHMENTS)
                )

        self._write(work)

    def dicom_state(self, name: str) -> tuple[str | None, str | None]:
        row = self._read(lambda conn: self._loop_row(conn, name))
        return row["dicom_state"], row["dicom_note"]

    # -- internals ------------------------------------------------------------------------------

    def _sweep_if_due(self) -> None:
        """Expire overdue loops before a read, so Describe and List never show an expired loop InProgress."""
        due = self._read(
            lambda conn: conn.execute(
                "SELECT 1 FROM loops WHERE status = 'InProgress' AND expires_at <= %s LIMIT 1", (self._now(),)
            ).fetchone()
        )
        if due is not None:
            self.expire()

    def _expire_in(self, conn: Connection, now: float, changes: Changes) -> tuple[builtins.list[str], int]:
        """Fail overdue loops and requeue overdue leases; rows another transaction holds are left to it.

        Runs in every write, so it first asks (one indexed round trip) whether anything is due at all.
        """
        due = one(
            conn.execute(
                "SELECT EXISTS (SELECT 1 FROM loops WHERE status = 'InProgress' AND expires_at <= %(now)s) AS loops,"
                " EXISTS (SELECT 1 FROM deliveries WHERE state = 'leased' AND lease_expires_at <= %(now)s) AS leases",
                {"now": now},
            )
        )
        failed: builtins.list[dict[str, Any]] = []
        if due["loops"]:
            failed = conn.execute(
                "SELECT seq, name, created_at, expires_at FROM loops WHERE status = 'InProgress' AND expires_at <= %s"
                " ORDER BY seq FOR UPDATE SKIP LOCKED",
                (now,),
            ).fetchall()
            if failed:
                with conn.cursor() as cur:
                    cur.executemany(
                        "UPDATE loops SET status = %s, failure_code = %s, failure_reason = %s, ended_at = %s"
                        " WHERE seq = %s",
                        [
                            (
                                str(LoopStatus.FAILED),
                                FAILURE_EXPIRED,
                                "not completed within TaskAvailabilityLifetimeInSeconds"
                                f" ({row['expires_at'] - row['created_at']:g} s)",
                                now,
                                row["seq"],
                            )
                            for row in failed
                        ],
                    )
                changes.freed(self._cancel_leases(conn, now, [row["seq"] for row in failed]))
        requeued: builtins.list[dict[str, Any]] = []
        if due["leases"]:
            requeued = conn.execute(
                "UPDATE deliveries AS d SET state = 'expired', ended_at = %(now)s FROM loops AS l"
                " WHERE l.seq = d.loop_seq AND d.id IN (SELECT id FROM deliveries"
                "   WHERE state = 'leased' AND lease_expires_at <= %(now)s FOR UPDATE SKIP LOCKED)"
                " RETURNING d.reviewer, l.flow",
                {"now": now},
            ).fetchall()
            for row in requeued:
                changes.work(row["flow"])
                changes.freed([row["reviewer"]])
        return [row["name"] for row in failed], len(requeued)

    @staticmethod
    def _cancel_leases(conn: Connection, now: float, loop_seqs: Iterable[int]) -> builtins.list[str]:
        """Close open leases on loops that take no more answers; the reviewers who held them."""
        rows = conn.execute(
            "UPDATE deliveries SET state = 'cancelled', ended_at = %s WHERE state = 'leased' AND loop_seq = ANY(%s)"
            " RETURNING reviewer",
            (now, builtins.list(loop_seqs)),
        ).fetchall()
        return [row["reviewer"] for row in rows]

    @staticmethod
    def _loop_row(conn: Connection, name: str, *, lock: bool = False) -> dict[str, Any]:
        row = conn.execute("SELECT * FROM loops WHERE name = %s" + (" FOR UPDATE" if lock else ""), (name,)).fetchone()
        if row is None:
            raise NotFound(f"human loop {name} not found")
        return row

    def _loop(self, conn: Connection, name: str) -> Loop:
        return row_loop(self._loop_row(conn, name))
