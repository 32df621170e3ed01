"""Review store on real SQLite files: idempotent loops, leased delivery, decisions that survive restarts and kills."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.review.flows import FlowDefinition, InvalidArgument, ResultSummary, TaskType, parse_conditions
from services.review.store import (
    ACTIVATION_REASONS_KEY,
    AlreadyExists,
    InvalidState,
    LoopStatus,
    NotFound,
    NotYourLease,
    ReviewStore,
    auto_loop_name,
)

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


@pytest.fixture
def store(db: Path, clock: FakeClock) -> Iterator[ReviewStore]:
    with ReviewStore(db, now=clock) as opened:
        yield opened


def start(store: ReviewStore, name: str, the_flow: FlowDefinition | None = None) -> None:
    store.start_loop(the_flow or flow(), name, {"study": name}, f"hash-{name}")


def test_database_is_wal_with_full_sync(store: ReviewStore, db: Path) -> None:
    with sqlite3.connect(db) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_start_is_idempotent_by_name_and_input(store: ReviewStore, clock: FakeClock) -> None:
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


def test_start_after_completion_returns_the_completed_loop(store: ReviewStore) -> None:
    start(store, "case-1")
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    assert store.start_loop(flow(), "case-1", {"study": "case-1"}, "hash-case-1").status is LoopStatus.COMPLETED


@pytest.mark.parametrize("name", ["Case-1", "-case", "case-", "case_1", "", "x" * 64])
def test_loop_names_follow_a2i_rules(store: ReviewStore, name: str) -> None:
    with pytest.raises(InvalidArgument):
        store.start_loop(flow(), name, {}, "h")


def test_input_must_be_plain_json(store: ReviewStore) -> None:
    with pytest.raises(InvalidArgument, match="plain JSON"):
        store.start_loop(flow(), "case-1", {"when": object()}, "h")
    with pytest.raises(InvalidArgument, match="image name"):
        store.start_loop(flow(), "case-1", {}, "h", images={"../x.png": b"x"})


def test_task_count_two_goes_to_two_different_reviewers(store: ReviewStore) -> None:
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


def test_one_reviewer_cannot_answer_a_loop_twice(store: ReviewStore) -> None:
    start(store, "case-1", flow(task_count=2))
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    with pytest.raises(AlreadyExists, match="already answered"):
        store.submit("d1-again", "r1", ANSWER, loop_name="case-1")


def test_max_in_flight_and_fifo_order(store: ReviewStore, clock: FakeClock) -> None:
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


def test_lease_is_limited_to_the_reviewers_flows(store: ReviewStore) -> None:
    start(store, "case-1", flow("chest"))
    start(store, "case-2", flow("brain"))
    assert [d.loop.name for d in store.lease("r1", ["brain"], max_in_flight=5, count=5)] == ["case-2"]
    with pytest.raises(InvalidArgument):
        store.lease("r1", [])


def test_expired_lease_is_redelivered(store: ReviewStore, clock: FakeClock) -> None:
    start(store, "case-1")
    (first,) = store.lease("r1", ["chest"])
    assert first.lease_expires_at == T0 + 300
    assert store.lease("r2", ["chest"]) == []
    assert store.next_deadline() == T0 + 300
    clock.advance(301)
    (second,) = store.lease("r2", ["chest"])
    assert second.loop.name == "case-1" and second.delivery_id != first.delivery_id
    assert store.in_flight("r1") == 0


def test_expired_lease_may_come_back_to_the_same_reviewer(store: ReviewStore, clock: FakeClock) -> None:
    start(store, "case-1")
    (first,) = store.lease("r1", ["chest"])
    clock.advance(301)
    assert store.expire().expired_leases == 1
    (again,) = store.lease("r1", ["chest"])
    assert again.loop.name == "case-1" and again.delivery_id != first.delivery_id


def test_late_answer_after_expiry_is_kept_and_closes_the_other_lease(store: ReviewStore, clock: FakeClock) -> None:
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


def test_release_gives_the_case_to_someone_else(store: ReviewStore) -> None:
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


def test_decisions_are_idempotent_by_id(store: ReviewStore, clock: FakeClock) -> None:
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


def test_replay_after_completion_returns_the_recorded_decision(store: ReviewStore) -> None:
    start(store, "case-1")
    (delivery,) = store.lease("r1", ["chest"])
    store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    replay = store.submit("d1", "r1", ANSWER, delivery_id=delivery.delivery_id)
    assert replay.replayed and replay.loop_status is LoopStatus.COMPLETED


def test_submit_checks_the_delivery_owner_and_loop(store: ReviewStore) -> None:
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


def test_restart_requeues_leases_and_keeps_decisions(db: Path, clock: FakeClock) -> None:
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


CHILD = """
import sys
from services.review.store import ReviewStore

store = ReviewStore(sys.argv[1])
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


def test_sigkill_mid_run_loses_no_acknowledged_decision(db: Path) -> None:
    crash_flow = flow("crash")
    names = [f"case-{i:03d}" for i in range(200)]
    with ReviewStore(db) as store:
        for name in names:
            store.start_loop(crash_flow, name, {"study": name}, name)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
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

    with ReviewStore(db) as store:
        for name in acknowledged:
            (decision,) = store.decisions(name)
            assert decision.decision_id == f"dec-{name}"
            assert store.describe(name).status is LoopStatus.COMPLETED
        recorded = {name: len(store.decisions(name)) for name in names}
        assert all(count <= 1 for count in recorded.values())
        assert store.in_flight("crash-reviewer") == 0  # the dead child's leases are back in the queue
        assert store.queue_depth() == 200 - sum(recorded.values())
        # The client retries everything it sent; acknowledged decisions replay, the rest are recorded once.
        for name in acknowledged:
            assert store.submit(f"dec-{name}", "crash-reviewer", ANSWER, loop_name=name).replayed
        while deliveries := store.lease("crash-reviewer", ["crash"], max_in_flight=50, count=50):
            for delivery in deliveries:
                store.submit(f"dec-{delivery.loop.name}", "crash-reviewer", ANSWER, delivery_id=delivery.delivery_id)
        for name in names:
            assert [d.decision_id for d in store.decisions(name)] == [f"dec-{name}"]
        completed, _ = store.list(status=LoopStatus.COMPLETED, max_results=100)
        assert len(completed) == 100 and store.queue_depth() == 0


def test_five_reviewer_threads_answer_each_case_exactly_task_count_times(db: Path) -> None:
    two = flow("busy", task_count=2)
    store = ReviewStore(db)
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


def test_loops_expire_after_their_availability_lifetime(store: ReviewStore, clock: FakeClock) -> None:
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


def test_stopped_loops_are_no_longer_delivered(store: ReviewStore, clock: FakeClock) -> None:
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


def test_delete_only_after_the_loop_ends(store: ReviewStore) -> None:
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


def test_list_pages_filters_and_sorts(store: ReviewStore, clock: FakeClock) -> None:
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


def test_waiters_wake_when_work_arrives(store: ReviewStore) -> None:
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


def test_subscribe_bridges_to_asyncio(store: ReviewStore) -> None:
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


def test_start_if_activated_starts_only_unsure_results(store: ReviewStore) -> None:
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


def test_a_newer_schema_is_refused(db: Path) -> None:
    ReviewStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(Exception, match="schema version 99"):
        ReviewStore(db)


def test_describe_and_list_show_expiry_without_a_sweep(store: ReviewStore, clock: FakeClock) -> None:
    start(store, "case-1", flow(lifetime_s=60))
    clock.advance(60)
    assert store.describe("case-1").status is LoopStatus.FAILED
    assert [loop.status for loop in store.list()[0]] == [LoopStatus.FAILED]
    store.delete("case-1")
