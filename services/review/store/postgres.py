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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, NoReturn, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from services.review.flows import ReviewError
from services.review.store.base import Changes
from services.review.store.model import (
    ALL_REVIEWERS,
    FAILURE_EXPIRED,
    Delivery,
    LeaseBatch,
    LoopStatus,
    StoreUnavailable,
    WorkEvent,
)
from services.review.store.postgres_schema import migrate
from services.review.store.schema import row_loop
from services.review.store.sql import SqlReviewStore, one

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


def redacted(url: str) -> str:
    """A connection URL fit for logs and messages: host, port and database, never a password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql://{host}:{port}/{parts.get('dbname') or ''}"


class PostgresReviewStore(SqlReviewStore[Connection]):
    """Human loops, deliveries and decisions in PostgreSQL; thread-safe; ``now`` is injectable.

    ``url``: a libpq URL or key/value string (``postgresql://user@host:5432/medgate``); a password is
    better kept in ``PGPASSFILE`` or ``PGPASSWORD`` than in the URL. ``pool_size``: connections at
    most (the review server's store threads, plus housekeeping). ``listen``: receive other replicas'
    work events (a server does; a command-line export does not need to). ``pool_timeout_s``: how long
    a call waits for a connection (the database down: then it fails, and the pool keeps reconnecting).
    """

    PLACEHOLDER: ClassVar[str] = "%s"
    GREATEST: ClassVar[str] = "GREATEST"

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

    def _for_update(self, of: str = "") -> str:
        return " FOR UPDATE" + (f" OF {of}" if of else "")

    def _lost_race(self, what: str) -> NoReturn:
        raise psycopg.errors.SerializationFailure(what)  # retryable: _write runs the transaction again

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
            in_flight = int(one(self._count_leases(conn, reviewer_id))["n"])
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

    # -- internals ------------------------------------------------------------------------------

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

    def _cancel_leases(self, conn: Connection, now: float, loop_seqs: Iterable[int]) -> builtins.list[str]:
        """Close open leases on loops that take no more answers; the reviewers who held them."""
        rows = conn.execute(
            "UPDATE deliveries SET state = 'cancelled', ended_at = %s WHERE state = 'leased' AND loop_seq = ANY(%s)"
            " RETURNING reviewer",
            (now, builtins.list(loop_seqs)),
        ).fetchall()
        return [row["reviewer"] for row in rows]
