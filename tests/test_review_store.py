"""Review store on real SQLite files and a real PostgreSQL server: idempotent loops, leased delivery, decisions
that survive restarts and kills, work events, renewal, schema migrations.

Every test that takes ``store`` or ``opener`` runs on both backends; a few are about one backend's own
behaviour (SQLite's file settings and its single owner, PostgreSQL's replicas sharing one database).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.review.flows import FlowDefinition, InvalidArgument, ResultSummary, TaskType, parse_conditions
from services.review.store import (
    ACTIVATION_REASONS_KEY,
    SCHEMA_VERSION,
    AlreadyExists,
    InvalidState,
    LoopStatus,
    NotFound,
    NotYourLease,
    ReviewStore,
    ReviewStoreBase,
    WorkEvent,
    auto_loop_name,
    open_store,
)
from services.review.store.postgres import PostgresReviewStore
from services.review.store.waiters import FlowWaiters, Waiter, WakeToken
from services.settings import load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
ANSWER = {"label": "normal"}


class FakeClock:
    """A clock tests move by hand, so leases and loops expire without sleeping."""

    def __init__(self, start: float = T0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def flow(
    name: str = "chest", *, task_count: int = 1, lifetime_s: float = 3600, time_limit_s: float = 300
) -> FlowDefinition:
    return FlowDefinition(
        name,
        TaskType.CLASSIFICATION,
        ("normal", "abnormal"),
        task_count=task_count,
        task_availability_lifetime_s=lifetime_s,
        task_time_limit_s=time_limit_s,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "review.db"


Opener = Callable[..., ReviewStoreBase]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def location(backend: str, db: Path, request: pytest.FixtureRequest) -> str:
    """Where the store under test lives: the SQLite file, or a fresh PostgreSQL database's URL."""
    return str(db) if backend == "sqlite" else str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def opener(backend: str, location: str) -> Opener:
    """Opens the store under test, the same file or database each time (a restart, or another replica)."""

    def open_one(**kwargs: Any) -> ReviewStoreBase:
        if backend == "sqlite":
            return ReviewStore(location, **kwargs)
        kwargs.pop("owner", None)
        return PostgresReviewStore(location, **kwargs)

    return open_one


@pytest.fixture
def store(opener: Opener, clock: FakeClock) -> Iterator[ReviewStoreBase]:
    with opener(now=clock) as opened:
        yield opened


def start(store: ReviewStoreBase, name: str, the_flow: FlowDefinition | None = None) -> None:
    store.start_loop(the_flow or flow(), name, {"study": name}, f"hash-{name}")


def test_sqlite_database_is_wal_with_full_sync(db: Path) -> None:
    with ReviewStore(db) as store, sqlite3.connect(db) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_open_store_follows_the_settings(tmp_path: Path, postgres_url: str) -> None:
    sqlite_settings = load_settings(review={"store_path": tmp_path / "sub" / "review.sqlite3"}).review
    with open_store(sqlite_settings) as store:
        assert isinstance(store, ReviewStore) and store.path == tmp_path / "sub" / "review.sqlite3"
    with open_store(load_settings(review={"store_url": postgres_url}).review) as store:
        assert isinstance(store, PostgresReviewStore)
        assert "postgres@" not in store.label and store.label.endswith(postgres_url.rsplit("/", 1)[1])
    with pytest.raises(Exception, match="postgresql://"):
        open_store(load_settings(review={"store_url": "mysql://db/review"}).review)


def test_start_is_idempotent_by_name_and_input(store: ReviewStoreBase, clock: FakeClock) -> None:
    first = store.start_loop(flow(), "case-1", {"study": "a"}, "h1", images={"image.png": b"png-1"})
    clock.advance(5)
    again = store.start_loop(flow(), "case-1", {"study": "a"}, "h1", images={"image.png": b"png-1"})
    assert again == first
    assert first.status is LoopStatus.IN_PROGRESS and first.created_at == T0
    assert first.expires_at == T0 + 3600 and first.task_count == 1 and first.image_names == ("image.png",)
    for content, input_hash, images, the_flow in [
        ({"study": "b"}, "h1", {"image.png": b"png-1"}, flow()),
        ({"study": "a"}, "h2", {"image.png": b"png-1"}, flow()),
        ({"study": "a"}, "h1", {"image.png": b"png-2"}, flow()),
        ({"study": "a"}, "h1", {"image.png": b"png-1"}, flow("other")),
    ]:
        with pytest.raises(AlreadyExists, match="case-1"):
            store.start_loop(the_flow, "case-1", content, input_hash, images=images)
    assert len(store.list()[0]) == 1
    assert store.images("case-1") == {"image.png": b"png-1"}


def test_start_after_completion_returns_the_completed_loop(store: ReviewStoreBase) -> None:
    start(store, "case-1")
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    assert store.start_loop(flow(), "case-1", {"study": "case-1"}, "hash-case-1").status is LoopStatus.COMPLETED


@pytest.mark.parametrize("name", ["Case-1", "-case", "case-", "case_1", "", "x" * 64])
def test_loop_names_follow_a2i_rules(store: ReviewStoreBase, name: str) -> None:
    with pytest.raises(InvalidArgument):
        store.start_loop(flow(), name, {}, "h")


def test_input_must_be_plain_json(store: ReviewStoreBase) -> None:
    with pytest.raises(InvalidArgument, match="plain JSON"):
        store.start_loop(flow(), "case-1", {"when": object()}, "h")
    with pytest.raises(InvalidArgument, match="image name"):
        store.start_loop(flow(), "case-1", {}, "h", images={"../x.png": b"x"})


def test_task_count_two_goes_to_two_different_reviewers(store: ReviewStoreBase) -> None:
    start(store, "case-1", flow(task_count=2))
    (first,) = store.lease("r1", ["chest"], max_in_flight=5, count=5)
    assert store.lease("r1", ["chest"], max_in_flight=5, count=5) == []  # never twice to one reviewer
    (second,) = store.lease("r2", ["chest"], max_in_flight=5, count=5)
    assert store.lease("r3", ["chest"], max_in_flight=5, count=5) == []  # both slots taken
    assert {first.reviewer_id, second.reviewer_id} == {"r1", "r2"}
    assert first.loop.name == second.loop.name == "case-1"
    decision = store.submit("d1", "r1", ANSWER, delivery_id=first.delivery_id)
    assert decision.loop_status is LoopStatus.IN_PROGRESS
    assert store.lease("r1", ["chest"], max_in_flight=5) == []  # answered: not again
    decision = store.submit("d2", "r2", {"label": "abnormal"}, delivery_id=second.delivery_id)
    assert decision.loop_status is LoopStatus.COMPLETED
    loop = store.describe("case-1")
    assert loop.status is LoopStatus.COMPLETED and loop.answers == 2 and loop.ended_at == T0
    assert [d.reviewer_id for d in store.decisions("case-1")] == ["r1", "r2"]


def test_one_reviewer_cannot_answer_a_loop_twice(store: ReviewStoreBase) -> None:
    start(store, "case-1", flow(task_count=2))
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    with pytest.raises(AlreadyExists, match="already answered"):
        store.submit("d1-again", "r1", ANSWER, loop_name="case-1")


def test_max_in_flight_and_fifo_order(store: ReviewStoreBase, clock: FakeClock) -> None:
    for i in range(5):
        start(store, f"case-{i}")
        clock.advance(1)
    leased = store.lease("r1", ["chest"], max_in_flight=3, count=10)
    assert [d.loop.name for d in leased] == ["case-0", "case-1", "case-2"]
    assert store.lease("r1", ["chest"], max_in_flight=3, count=10) == []
    assert store.in_flight("r1") == 3
    store.submit("d0", "r1", ANSWER, delivery_id=leased[0].delivery_id)
    assert [d.loop.name for d in store.lease("r1", ["chest"], max_in_flight=3, count=10)] == ["case-3"]
    assert store.queue_depth() == 1 and store.queue_depth("chest") == 1 and store.queue_depth("other") == 0


def test_lease_is_limited_to_the_reviewers_flows(store: ReviewStoreBase) -> None:
    start(store, "case-1", flow("chest"))
    start(store, "case-2", flow("brain"))
    assert [d.loop.name for d in store.lease("r1", ["brain"], max_in_flight=5, count=5)] == ["case-2"]
    with pytest.raises(InvalidArgument):
        store.lease("r1", [])


def test_expired_lease_is_redelivered(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1")
    (first,) = store.lease("r1", ["chest"])
    assert first.lease_expires_at == T0 + 300
    assert store.lease("r2", ["chest"]) == []
    assert store.next_deadline() == T0 + 300
    clock.advance(301)
    (second,) = store.lease("r2", ["chest"])
    assert second.loop.name == "case-1" and second.delivery_id != first.delivery_id
    assert store.in_flight("r1") == 0


def test_expired_lease_may_come_back_to_the_same_reviewer(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1")
    (first,) = store.lease("r1", ["chest"])
    clock.advance(301)
    assert store.expire().expired_leases == 1
    (again,) = store.lease("r1", ["chest"])
    assert again.loop.name == "case-1" and again.delivery_id != first.delivery_id


def test_late_answer_after_expiry_is_kept_and_closes_the_other_lease(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1")
    (late,) = store.lease("r1", ["chest"])
    clock.advance(301)
    (current,) = store.lease("r2", ["chest"])
    decision = store.submit("d1", "r1", ANSWER, delivery_id=late.delivery_id)
    assert decision.loop_status is LoopStatus.COMPLETED
    assert decision.accepted_at == T0 and decision.time_spent_s == 301
    with pytest.raises(InvalidState, match="Completed"):
        store.submit("d2", "r2", ANSWER, delivery_id=current.delivery_id)
    assert store.in_flight("r2") == 0


def test_release_gives_the_case_to_someone_else(store: ReviewStoreBase) -> None:
    start(store, "case-1")
    (delivery,) = store.lease("r1", ["chest"])
    with pytest.raises(NotYourLease):
        store.release(delivery.delivery_id, "r2")
    with pytest.raises(NotFound):
        store.release("no-such-delivery", "r1")
    version = store.work_version
    store.release(delivery.delivery_id, "r1")
    store.release(delivery.delivery_id, "r1")  # idempotent
    assert store.work_version == version + 1
    assert store.queue_depth() == 1
    assert store.lease("r1", ["chest"]) == []  # released means "not for me"
    (other,) = store.lease("r2", ["chest"])
    assert other.loop.name == "case-1"


def test_decisions_are_idempotent_by_id(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1", flow(task_count=2))
    (delivery,) = store.lease("r1", ["chest"])
    clock.advance(12)
    first = store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    assert not first.replayed and first.time_spent_s == 12
    clock.advance(30)
    replay = store.submit("d1", "r1", dict(ANSWER), delivery_id=delivery.delivery_id)
    assert replay.replayed and replay.submitted_at == first.submitted_at and replay.answer == first.answer
    assert store.submit("d1", "r1", ANSWER, loop_name="case-1").replayed  # same payload by loop name
    with pytest.raises(AlreadyExists, match="different payload"):
        store.submit("d1", "r1", {"label": "abnormal"}, delivery_id=delivery.delivery_id)
    start(store, "case-2")
    with pytest.raises(AlreadyExists, match="different payload"):
        store.submit("d1", "r1", ANSWER, loop_name="case-2")
    assert len(store.decisions("case-1")) == 1
    assert store.describe("case-1").answers == 1


def test_replay_after_completion_returns_the_recorded_decision(store: ReviewStoreBase) -> None:
    start(store, "case-1")
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    replay = store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    assert replay.replayed and replay.loop_status is LoopStatus.COMPLETED


def test_submit_checks_the_delivery_owner_and_loop(store: ReviewStoreBase) -> None:
    start(store, "case-1")
    start(store, "case-2")
    (delivery,) = store.lease("r1", ["chest"])
    with pytest.raises(NotYourLease, match="another reviewer"):
        store.submit("d1", "r2", ANSWER, delivery_id=delivery.delivery_id)
    with pytest.raises(NotFound):
        store.submit("d1", "r1", ANSWER, delivery_id="no-such-delivery")
    with pytest.raises(InvalidArgument, match="not for human loop"):
        store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id, loop_name="case-2")
    with pytest.raises(NotFound):
        store.submit("d1", "r1", ANSWER, loop_name="case-9")
    with pytest.raises(InvalidArgument):
        store.submit("d1", "r1", ANSWER)
    with pytest.raises(InvalidArgument):
        store.submit("", "r1", ANSWER, loop_name="case-1")


def test_sqlite_restart_requeues_leases_and_keeps_decisions(db: Path, clock: FakeClock) -> None:
    with ReviewStore(db, now=clock) as store:
        for i in range(4):
            start(store, f"case-{i}")
        leased = store.lease("r1", ["chest"], max_in_flight=3, count=3)
        store.submit("d0", "r1", ANSWER, delivery_id=leased[0].delivery_id)
        assert store.queue_depth() == 1
    with ReviewStore(db, now=clock) as store:
        assert store.in_flight("r1") == 0
        assert store.queue_depth() == 3
        (decision,) = store.decisions(leased[0].loop.name)
        assert decision.decision_id == "d0" and decision.answer == ANSWER
        assert store.describe(leased[0].loop.name).status is LoopStatus.COMPLETED
        again = store.lease("r1", ["chest"], max_in_flight=5, count=5)
        assert sorted(d.loop.name for d in again) == ["case-1", "case-2", "case-3"]
        # A client that re-received the case resends its decision under the new delivery: one decision.
        store.submit("d1", "r1", ANSWER, delivery_id=again[0].delivery_id)
        assert store.submit("d1", "r1", ANSWER, delivery_id=again[0].delivery_id).replayed


def test_postgres_replica_leaves_leases_to_their_reviewer_and_keeps_decisions(
    postgres_url: str, clock: FakeClock
) -> None:
    first = PostgresReviewStore(postgres_url, now=clock)
    for i in range(4):
        start(first, f"case-{i}")
    leased = first.lease("r1", ["chest"], max_in_flight=3, count=3)
    first.submit("d0", "r1", ANSWER, delivery_id=leased[0].delivery_id)
    with PostgresReviewStore(postgres_url, now=clock) as second:  # another replica, or this one restarted
        first.close()
        assert second.in_flight("r1") == 2  # another replica may be serving them: not taken back
        assert second.queue_depth() == 1
        (decision,) = second.decisions(leased[0].loop.name)
        assert decision.decision_id == "d0" and decision.answer == ANSWER
        # The reviewer reconnects here: its open leases are sent again, and its answers to them count.
        reopened = second.open_deliveries("r1")
        assert [d.delivery_id for d in reopened] == [d.delivery_id for d in leased[1:]]
        second.submit("d1", "r1", ANSWER, delivery_id=reopened[0].delivery_id)
        assert second.submit("d1", "r1", ANSWER, loop_name=reopened[0].loop.name).replayed
        # A reviewer who never comes back: its lease returns to the queue when its time limit passes.
        assert second.lease("r2", ["chest"], max_in_flight=5, count=5)[0].loop.name == "case-3"
        clock.advance(301)
        assert second.expire().expired_leases == 2  # r1's case-2 and r2's case-3
        assert sorted(d.loop.name for d in second.lease("r3", ["chest"], max_in_flight=5, count=5)) == [
            "case-2",
            "case-3",
        ]


CHILD = """
import sys
from services.review.store import ReviewStore
from services.review.store.postgres import PostgresReviewStore

where = sys.argv[1]
store = PostgresReviewStore(where, listen=False) if where.startswith("postgresql://") else ReviewStore(where)
while True:
    deliveries = store.lease("crash-reviewer", ["crash"], max_in_flight=4, count=4)
    if not deliveries:
        break
    for delivery in deliveries:
        store.submit("dec-" + delivery.loop.name, "crash-reviewer", {"label": "normal"},
                     delivery_id=delivery.delivery_id)
        print(delivery.loop.name, flush=True)  # printed only once submit returned: acknowledged
print("DONE", flush=True)
"""


def test_sigkill_mid_run_loses_no_acknowledged_decision(opener: Opener, location: str, backend: str) -> None:
    crash_flow = flow("crash")
    names = [f"case-{i:03d}" for i in range(200)]
    with opener() as store:
        for name in names:
            store.start_loop(crash_flow, name, {"study": name}, name)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, location], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    for line in child.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) == 60:
            os.kill(child.pid, signal.SIGKILL)
            break
    acknowledged += [line.strip() for line in child.stdout if line.endswith("\n")]
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert "DONE" not in acknowledged and len(acknowledged) < 200

    with opener() as store:
        for name in acknowledged:
            (decision,) = store.decisions(name)
            assert decision.decision_id == f"dec-{name}"
            assert store.describe(name).status is LoopStatus.COMPLETED
        recorded = {name: len(store.decisions(name)) for name in names}
        assert all(count <= 1 for count in recorded.values())
        # SQLite: the dead child's leases are back in the queue. PostgreSQL: they wait for their reviewer
        # (another replica could be serving it), who gets them again when it reconnects.
        still_leased = store.open_deliveries("crash-reviewer")
        assert len(still_leased) == (0 if backend == "sqlite" else store.in_flight("crash-reviewer")) <= 4
        assert store.queue_depth() == 200 - sum(recorded.values()) - len(still_leased)
        # The client retries everything it sent; acknowledged decisions replay, the rest are recorded once.
        for name in acknowledged:
            assert store.submit(f"dec-{name}", "crash-reviewer", ANSWER, loop_name=name).replayed
        for delivery in still_leased:
            store.submit(f"dec-{delivery.loop.name}", "crash-reviewer", ANSWER, delivery_id=delivery.delivery_id)
        while deliveries := store.lease("crash-reviewer", ["crash"], max_in_flight=50, count=50):
            for delivery in deliveries:
                store.submit(f"dec-{delivery.loop.name}", "crash-reviewer", ANSWER, delivery_id=delivery.delivery_id)
        for name in names:
            assert [d.decision_id for d in store.decisions(name)] == [f"dec-{name}"]
        completed, _ = store.list(status=LoopStatus.COMPLETED, max_results=100)
        assert len(completed) == 100 and store.queue_depth() == 0


def test_five_reviewer_threads_answer_each_case_exactly_task_count_times(opener: Opener) -> None:
    two = flow("busy", task_count=2)
    store = opener()
    names = [f"case-{i:03d}" for i in range(200)]
    for name in names:
        store.start_loop(two, name, {"study": name}, name)
    errors: list[BaseException] = []

    def reviewer(reviewer_id: str) -> None:
        try:
            while True:
                version = store.work_version
                deliveries = store.lease(reviewer_id, ["busy"], max_in_flight=3, count=3)
                if not deliveries:
                    if store.queue_depth() == 0:
                        return
                    store.wait_for_work(version, timeout_s=0.05)
                    continue
                for delivery in deliveries:
                    store.submit(
                        f"{reviewer_id}-{delivery.loop.name}", reviewer_id, ANSWER, delivery_id=delivery.delivery_id
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    answered_by = Counter[str]()
    for name in names:
        decisions = store.decisions(name)
        reviewers = [d.reviewer_id for d in decisions]
        assert len(reviewers) == 2 and len(set(reviewers)) == 2, (name, reviewers)
        answered_by.update(reviewers)
        assert store.describe(name).status is LoopStatus.COMPLETED
    assert sum(answered_by.values()) == 400
    store.close()


def test_loops_expire_after_their_availability_lifetime(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1", flow(lifetime_s=600, time_limit_s=300))
    start(store, "case-2", flow(lifetime_s=6000))
    (delivery,) = store.lease("r1", ["chest"])
    assert store.next_deadline() == T0 + 300
    clock.advance(300)
    store.expire()
    clock.advance(300)
    report = store.expire()
    assert report.failed_loops == ("case-1",)
    loop = store.describe("case-1")
    assert loop.status is LoopStatus.FAILED and loop.failure_code == "Expired"
    assert loop.failure_reason is not None and "TaskAvailabilityLifetimeInSeconds" in loop.failure_reason
    with pytest.raises(InvalidState, match="Failed"):
        store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    assert [d.loop.name for d in store.lease("r2", ["chest"], max_in_flight=5, count=5)] == ["case-2"]


def test_stopped_loops_are_no_longer_delivered(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1", flow(task_count=2))
    (delivery,) = store.lease("r1", ["chest"])
    clock.advance(3)
    stopped = store.stop("case-1")
    assert stopped.status is LoopStatus.STOPPED and stopped.ended_at == T0 + 3
    assert store.stop("case-1") == stopped  # no-op
    assert store.lease("r2", ["chest"]) == []
    assert store.in_flight("r1") == 0 and store.queue_depth() == 0
    with pytest.raises(InvalidState, match="Stopped"):
        store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)


def test_delete_only_after_the_loop_ends(store: ReviewStoreBase) -> None:
    start(store, "case-1")
    with pytest.raises(InvalidState, match="stop it"):
        store.delete("case-1")
    store.stop("case-1")
    store.delete("case-1")
    with pytest.raises(NotFound):
        store.describe("case-1")
    with pytest.raises(NotFound):
        store.delete("case-1")
    start(store, "case-1")  # the name is free again
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    with pytest.raises(InvalidState, match="Completed"):
        store.stop("case-1")
    store.delete("case-1")
    assert store.list() == ([], None)


def test_list_pages_filters_and_sorts(store: ReviewStoreBase, clock: FakeClock) -> None:
    for i in range(7):
        start(store, f"case-{i}", flow("chest" if i % 2 == 0 else "brain"))
        clock.advance(10)
    store.stop("case-3")
    names: list[str] = []
    token = None
    while True:
        page, token = store.list(max_results=3, next_token=token)
        assert len(page) <= 3
        names += [loop.name for loop in page]
        if token is None:
            break
    assert names == [f"case-{i}" for i in reversed(range(7))]
    page, token = store.list(ascending=True, max_results=4)
    assert [loop.name for loop in page] == ["case-0", "case-1", "case-2", "case-3"] and token is not None
    rest, last = store.list(ascending=True, max_results=4, next_token=token)
    assert [loop.name for loop in rest] == ["case-4", "case-5", "case-6"] and last is None
    assert [loop.name for loop in store.list(flow="brain", ascending=True)[0]] == ["case-1", "case-3", "case-5"]
    assert [loop.name for loop in store.list(status="Stopped")[0]] == ["case-3"]
    window = store.list(created_after=T0 + 20, created_before=T0 + 50, ascending=True)[0]
    assert [loop.name for loop in window] == ["case-2", "case-3", "case-4"]  # after inclusive, before exclusive
    with pytest.raises(InvalidArgument, match="different query"):
        store.list(ascending=False, max_results=4, next_token=token)
    with pytest.raises(InvalidArgument, match="token"):
        store.list(next_token="not-a-token")
    for bad in (0, 101):
        with pytest.raises(InvalidArgument, match="max_results"):
            store.list(max_results=bad)
    with pytest.raises(InvalidArgument, match="status"):
        store.list(status="Running")


def test_waiters_wake_when_work_arrives(store: ReviewStoreBase) -> None:
    seen: list[int] = []
    unsubscribe = store.subscribe(seen.append)
    version = store.work_version
    woke: list[int] = []
    waiter = threading.Thread(target=lambda: woke.append(store.wait_for_work(version, timeout_s=10)))
    waiter.start()
    start(store, "case-1")
    waiter.join(timeout=10)
    assert woke == [version + 1] and seen == [version + 1]
    assert store.wait_for_work(version, timeout_s=0) == version + 1  # already newer: no wait
    unsubscribe()
    start(store, "case-2")
    assert seen == [version + 1]


def test_subscribe_bridges_to_asyncio(store: ReviewStoreBase) -> None:
    async def main() -> str:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        unsubscribe = store.subscribe(lambda _version: loop.call_soon_threadsafe(event.set))
        try:
            await asyncio.gather(asyncio.to_thread(start, store, "case-1"), asyncio.wait_for(event.wait(), 10))
        finally:
            unsubscribe()
        (delivery,) = await asyncio.to_thread(store.lease, "r1", ["chest"])
        return delivery.loop.name

    assert asyncio.run(main()) == "case-1"


def test_start_if_activated_starts_only_unsure_results(store: ReviewStoreBase) -> None:
    unsure_flow = FlowDefinition(
        "chest",
        TaskType.CLASSIFICATION,
        ("normal", "abnormal"),
        activation_conditions=parse_conditions(
            {
                "ConditionType": "ConfidenceLessThan",
                "ConditionParameters": {"Score": "top_class", "ConfidenceLessThan": 0.9},
            }
        ),
    )
    assert store.start_if_activated(unsure_flow, ResultSummary("sure", top_class_score=0.97), {"study": "s"}) is None
    loop = store.start_if_activated(
        unsure_flow, ResultSummary("unsure", top_class_score=0.6), {"study": "u"}, images={"image.png": b"png"}
    )
    assert loop is not None and loop.name == auto_loop_name("chest", "unsure")
    assert loop.input_content == {"study": "u", ACTIVATION_REASONS_KEY: ["ConfidenceLessThan top_class 0.6000 < 0.9"]}
    # The same image again, with a slightly different result: one loop per image per flow.
    again = store.start_if_activated(unsure_flow, ResultSummary("unsure", top_class_score=0.5), {"study": "u2"})
    assert again is not None and again.name == loop.name and again.input_content == loop.input_content
    with pytest.raises(AlreadyExists):
        store.start_if_activated(
            unsure_flow, ResultSummary("unsure", top_class_score=0.5), {"study": "u2"}, name=loop.name
        )


def test_auto_loop_names_are_valid_and_stable() -> None:
    long_flow = "f" * 60
    name = auto_loop_name(long_flow, "abc")
    assert name == auto_loop_name(long_flow, "abc") != auto_loop_name(long_flow, "abd")
    assert len(name) <= 63
    FlowDefinition(name, TaskType.SEGMENTATION)  # passes A2I's name rule


def test_a_newer_schema_is_refused(opener: Opener, backend: str, location: str) -> None:
    opener().close()
    if backend == "sqlite":
        with sqlite3.connect(location) as conn:
            conn.execute("PRAGMA user_version=99")
    else:
        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute("INSERT INTO schema_version (version, applied_at, description) VALUES (99, 0, 'future')")
    with pytest.raises(Exception, match="schema version 99"):
        opener()


def test_describe_and_list_show_expiry_without_a_sweep(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1", flow(lifetime_s=60))
    clock.advance(60)
    assert store.describe("case-1").status is LoopStatus.FAILED
    assert [loop.status for loop in store.list()[0]] == [LoopStatus.FAILED]
    store.delete("case-1")


# --- lease renewal -------------------------------------------------------------------------------------


def test_renewal_keeps_a_case_while_the_reviewer_works_on_it(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1")
    start(store, "case-2", flow(lifetime_s=400))
    first, short = store.lease("r1", ["chest"], max_in_flight=2, count=2)
    clock.advance(200)
    renewed = store.renew(first.delivery_id, "r1")
    assert renewed.delivery_id == first.delivery_id and renewed.leased_at == T0
    assert renewed.lease_expires_at == T0 + 200 + 300
    assert store.renew(short.delivery_id, "r1").lease_expires_at == T0 + 400  # never past the loop's expiry
    clock.advance(250)  # past the first lease's original end, within the renewed one
    assert store.expire().expired_leases == 0
    assert store.lease("r2", ["chest"]) == []
    assert store.open_deliveries("r1")[0].lease_expires_at == T0 + 500
    with pytest.raises(NotYourLease):
        store.renew(first.delivery_id, "r2")
    with pytest.raises(NotFound):
        store.renew("no-such-delivery", "r1")
    decision = store.submit("d1", "r1", ANSWER, delivery_id=first.delivery_id)
    assert decision.accepted_at == T0 and decision.time_spent_s == 450
    with pytest.raises(InvalidState, match="answered"):
        store.renew(first.delivery_id, "r1")


def test_an_expired_lease_cannot_be_renewed(store: ReviewStoreBase, clock: FakeClock) -> None:
    start(store, "case-1")
    (delivery,) = store.lease("r1", ["chest"])
    clock.advance(300)
    with pytest.raises(InvalidState, match="expired"):
        store.renew(delivery.delivery_id, "r1")
    (again,) = store.lease("r2", ["chest"])
    assert again.loop.name == "case-1"


def test_lease_batch_says_how_many_more_the_reviewer_may_hold(store: ReviewStoreBase) -> None:
    for i in range(3):
        start(store, f"case-{i}")
    batch = store.lease_batch("r1", ["chest"], max_in_flight=5, count=5)
    assert len(batch.deliveries) == 3 and batch.free_slots == 2  # room left, no work: wait for a new case
    full = store.lease_batch("r2", ["chest"], max_in_flight=1, count=1)
    assert full.deliveries == () and full.free_slots == 1
    start(store, "case-3")
    taken = store.lease_batch("r2", ["chest"], max_in_flight=1, count=1)
    assert len(taken.deliveries) == 1 and taken.free_slots == 0  # full: wait for one of its own to end


# --- work events ---------------------------------------------------------------------------------------


def test_work_events_name_the_flow_and_the_reviewer(store: ReviewStoreBase, clock: FakeClock) -> None:
    events: list[WorkEvent] = []
    store.listen(events.append)
    start(store, "case-1", flow(task_count=2))
    assert events == [WorkEvent({"chest": 2})]  # two reviewers may take it
    (first,) = store.lease("r1", ["chest"])
    (second,) = store.lease("r2", ["chest"])
    store.renew(first.delivery_id, "r1")
    assert len(events) == 1  # leasing and renewing make no work for anyone
    store.release(second.delivery_id, "r2")
    assert events[-1] == WorkEvent({"chest": 1}, frozenset({"r2"}))
    store.submit("d1", "r1", ANSWER, delivery_id=first.delivery_id)
    assert events[-1] == WorkEvent({}, frozenset({"r1"}))  # r1 has room again; no new case
    store.submit("d1", "r1", ANSWER, delivery_id=first.delivery_id)  # a replay changes nothing
    assert len(events) == 3
    assert len(store.lease("r3", ["chest"])) == 1
    clock.advance(301)
    store.expire()
    assert events[-1] == WorkEvent({"chest": 1}, frozenset({"r3"}))  # back in the queue, r3 has room
    assert len(store.lease("r4", ["chest"])) == 1
    store.stop("case-1")
    assert events[-1] == WorkEvent({}, frozenset({"r4"}))  # its lease was cancelled
    assert store.work_version == 3  # started, released, expired: work that may be deliverable


def test_postgres_replicas_hear_each_others_work(postgres_url: str) -> None:
    with PostgresReviewStore(postgres_url) as first, PostgresReviewStore(postgres_url) as second:
        heard: list[WorkEvent] = []
        own: list[WorkEvent] = []
        arrived = threading.Event()
        second.listen(lambda event: (heard.append(event), arrived.set()))
        first.listen(own.append)
        start(first, "case-1")
        assert arrived.wait(10)
        assert heard == [WorkEvent({"chest": 1})]
        assert own == [WorkEvent({"chest": 1})]  # published at commit, not again when the notification returns
        version = second.work_version
        (delivery,) = second.lease("r1", ["chest"])
        arrived.clear()
        second.release(delivery.delivery_id, "r1")
        deadline = time.monotonic() + 10
        while own[-1] != WorkEvent({"chest": 1}, frozenset({"r1"})) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert own[-1] == WorkEvent({"chest": 1}, frozenset({"r1"}))
        assert second.work_version == version + 1
        assert first.wait_for_work(first.work_version - 1, timeout_s=0) >= 2


def test_postgres_a_notification_of_many_reviewers_names_them_all_at_once(postgres_url: str, clock: FakeClock) -> None:
    reviewers = [f"https://idp.hospital.invalid/realms/medgate#{i:040d}" for i in range(150)]
    with PostgresReviewStore(postgres_url, now=clock) as first, PostgresReviewStore(postgres_url, now=clock) as second:
        for index, reviewer in enumerate(reviewers):
            start(first, f"case-{index}")
            first.lease(reviewer, ["chest"])
        heard: list[WorkEvent] = []
        arrived = threading.Event()
        second.listen(lambda event: (heard.append(event), arrived.set()))
        clock.advance(301)
        assert first.expire().expired_leases == 150  # one transaction: more names than a notification holds
        assert arrived.wait(10)
        assert heard == [WorkEvent({"chest": 150}, frozenset({"*"}))]


def test_postgres_two_replicas_and_ten_reviewers_answer_each_case_exactly_task_count_times(postgres_url: str) -> None:
    two = flow("busy", task_count=2)
    replicas = [PostgresReviewStore(postgres_url), PostgresReviewStore(postgres_url)]
    names = [f"case-{i:03d}" for i in range(150)]
    for index, name in enumerate(names):
        replicas[index % 2].start_loop(two, name, {"study": name}, name)
    errors: list[BaseException] = []

    def reviewer(index: int) -> None:
        store, reviewer_id = replicas[index % 2], f"r{index}"
        try:
            while True:
                version = store.work_version
                deliveries = store.lease(reviewer_id, ["busy"], max_in_flight=2, count=2)
                if not deliveries:
                    if store.queue_depth() == 0:
                        return
                    store.wait_for_work(version, timeout_s=0.05)
                    continue
                for delivery in deliveries:
                    store.submit(
                        f"{reviewer_id}-{delivery.loop.name}", reviewer_id, ANSWER, delivery_id=delivery.delivery_id
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for name in names:
        reviewers = [d.reviewer_id for d in replicas[0].decisions(name)]
        assert len(reviewers) == 2 and len(set(reviewers)) == 2, (name, reviewers)
        assert replicas[1].describe(name).status is LoopStatus.COMPLETED
    for replica in replicas:
        replica.close()


# --- schema migrations (PostgreSQL; SQLite's are in test_review_identity.py) ------------------------------


def test_postgres_schema_versions_are_recorded_once_even_when_replicas_start_together(postgres_url: str) -> None:
    stores: list[PostgresReviewStore] = []
    threads = [threading.Thread(target=lambda: stores.append(PostgresReviewStore(postgres_url))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(stores) == 3
    for store in stores:
        store.close()
    with psycopg.connect(postgres_url) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_postgres_a_version_1_database_is_migrated_and_keeps_its_decisions(postgres_url: str) -> None:
    from services.review.store import postgres_schema

    with psycopg.connect(postgres_url, autocommit=True) as conn:  # a database as version 1 left it
        conn.execute(postgres_schema.VERSION_TABLE)
        conn.execute(postgres_schema.SCHEMA)
        conn.execute("INSERT INTO schema_version VALUES (1, 0, 'loops, images, deliveries, decisions')")
        conn.execute(
            "INSERT INTO loops (name, flow, task_type, status, input_json, input_hash, input_digest, image_names,"
            " task_count, task_time_limit_s, answers, created_at, expires_at, ended_at)"
            " VALUES ('case-1', 'chest', 'classification', 'Completed', '{}', 'h1', 'x', '[]', 1, 300, 1, 1, 9e9, 2)"
        )
        conn.execute(
            "INSERT INTO decisions (id, loop_seq, reviewer, answer_json, payload_digest, accepted_at, submitted_at)"
            " VALUES ('d1', 1, 'dr-old', '{\"label\": \"normal\"}', 'p', 1, 2)"
        )
    with PostgresReviewStore(postgres_url) as store:
        (before,) = store.decisions("case-1")
        assert (before.reviewer_id, before.issuer, before.subject, before.answer) == (
            "dr-old",
            None,
            None,
            {"label": "normal"},
        )
        start(store, "case-2")
        (delivery,) = store.lease("idp#dr-a", ["chest"])
        store.submit("d2", "idp#dr-a", ANSWER, delivery_id=delivery.delivery_id, issuer="idp", subject="dr-a")
        assert store.decisions("case-2")[0].subject == "dr-a"
    with psycopg.connect(postgres_url) as conn:
        descriptions = [row[0] for row in conn.execute("SELECT description FROM schema_version ORDER BY version")]
    assert len(descriptions) == SCHEMA_VERSION and "issuer" in descriptions[1]


def test_postgres_url_is_never_shown_with_its_password() -> None:
    from services.review.store.postgres import redacted

    assert redacted("postgresql://medgate:s3cret@db.hospital:6432/review") == "postgresql://db.hospital:6432/review"
    with pytest.raises(Exception) as failure:
        PostgresReviewStore("postgresql://medgate:s3cret@127.0.0.1:1/review", connect_timeout_s=1)
    assert "s3cret" not in str(failure.value) and "127.0.0.1:1/review" in str(failure.value)


# --- who is woken: the per-flow waiter queue ------------------------------------------------------------


async def _settle() -> None:
    """Let woken waiters run (an event, then wait_for's inner task, then the waiting task)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _park(waiters: FlowWaiters, waiter: Waiter, *, full: bool = False) -> asyncio.Task[WakeToken | None]:
    task = asyncio.create_task(waiters.wait(waiter, waiters.snapshot(waiter), full=full, timeout_s=30))
    await _settle()  # let it queue
    return task


async def test_a_new_case_wakes_one_waiting_reviewer_of_its_flow_longest_waiting_first() -> None:
    waiters = FlowWaiters()
    chest = [waiters.register(f"r{i}", ["chest"]) for i in range(5)]
    brain = waiters.register("b", ["brain"])
    tasks = [await _park(waiters, w) for w in [*chest, brain]]
    assert waiters.waiting("chest") == 5 and waiters.waiting() == 6
    waiters.dispatch(WorkEvent({"chest": 1}))
    await _settle()
    assert [t.done() for t in tasks] == [True, False, False, False, False, False]
    token = tasks[0].result()
    assert token is not None and token.flow == "chest"
    waiters.dispatch(WorkEvent({"chest": 2}))  # a task_count 2 loop: two reviewers
    await _settle()
    assert [t.done() for t in tasks] == [True, True, True, False, False, False]
    assert waiters.wakeups == 3 and waiters.waiting("chest") == 2
    waiters.dispatch(WorkEvent(everything=True))  # a lost listener connection: everyone looks again
    await asyncio.gather(*tasks)
    assert waiters.waiting() == 0


async def test_a_reviewer_who_cannot_take_the_case_hands_it_on() -> None:
    waiters = FlowWaiters()
    first, second, third = (waiters.register(f"r{i}", ["chest"]) for i in range(3))
    tasks = [await _park(waiters, w) for w in (first, second, third)]
    waiters.dispatch(WorkEvent({"chest": 1}))
    token = await tasks[0]
    assert token is not None
    waiters.decline(first, token)  # e.g. r0 released this case before
    assert await tasks[1] is token
    assert not tasks[2].done()
    again = await _park(waiters, first)  # r0 waits again, r1 leaves without looking: r2's turn, not r0's
    waiters.unregister(second)
    assert await tasks[2] is token
    assert not again.done()
    waiters.decline(third, token)  # nobody left who has not tried: dropped
    await _settle()
    assert not again.done()
    again.cancel()


async def test_an_event_while_the_stream_leased_is_not_lost() -> None:
    waiters = FlowWaiters()
    waiter = waiters.register("r1", ["chest"])
    snapshot = waiters.snapshot(waiter)  # then the lease query runs; meanwhile a case arrives
    waiters.dispatch(WorkEvent({"chest": 1}))
    assert await asyncio.wait_for(waiters.wait(waiter, snapshot, full=False, timeout_s=30), 1) is None
    snapshot = waiters.snapshot(waiter)
    waiters.dispatch(WorkEvent({}, frozenset({"r1"})))  # its own lease ended while it was full
    assert await asyncio.wait_for(waiters.wait(waiter, snapshot, full=True, timeout_s=30), 1) is None


async def test_a_free_slot_wakes_only_that_reviewers_full_streams() -> None:
    waiters = FlowWaiters()
    full_r1 = waiters.register("r1", ["chest"])
    full_r2 = waiters.register("r2", ["chest"])
    idle_r1 = waiters.register("r1", ["chest"])
    tasks = [
        await _park(waiters, full_r1, full=True),
        await _park(waiters, full_r2, full=True),
        await _park(waiters, idle_r1),
    ]
    waiters.dispatch(WorkEvent({}, frozenset({"r1", "nobody-here"})))
    await _settle()
    assert [t.done() for t in tasks] == [True, False, False]
    waiters.dispatch(WorkEvent({"chest": 1}))  # full streams wait for room, not for cases
    await _settle()
    assert [t.done() for t in tasks] == [True, False, True]
    waiters.dispatch(WorkEvent({}, frozenset({"*"})))
    await asyncio.gather(*tasks)


def test_a_database_outage_is_store_unavailable_and_unavailable_over_grpc(tmp_path: Path) -> None:
    """PostgreSQL stopped under a running store: calls fail fast as StoreUnavailable (UNAVAILABLE), not INTERNAL."""
    import grpc

    from services.review.store import StoreUnavailable
    from services.review.store.postgres import PostgresReviewStore
    from services.rpc.status import status_for
    from tests.postgres import PostgresCluster, PostgresUnavailable

    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {exc}")
        pytest.skip(str(exc))
    cluster.start()
    try:
        store = PostgresReviewStore(cluster.create_database("outage"), pool_size=2, listen=False, pool_timeout_s=1.0)
        try:
            assert store.queue_depth("any-flow") == 0
            cluster.stop()
            with pytest.raises(StoreUnavailable) as outage:
                store.queue_depth("any-flow")
            assert status_for(outage.value)[0] == grpc.StatusCode.UNAVAILABLE
        finally:
            store.close()
    finally:
        cluster.stop()
