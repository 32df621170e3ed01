"""The review service on PostgreSQL: the service tests again, lease renewal and wake-ups on both backends, and two
replicas on one database with 1,000 routed cases, 20 reviewers and a ``kill -9`` of one replica mid-run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest

import tests.test_review_service as service_tests
from clients.reviewer import LeaseKeeper, decision_id
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.security.identity import Role
from services.settings import load_settings
from tests.conftest import free_port
from tests.test_review_identity import Tokens, token_settings
from tests.test_review_service import next_case, wait_serving, write_flows

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgres"])
async def review(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[ReviewServer, pb_grpc.ReviewStub]]:
    """A review server on a fresh store of either backend (the service tests below run on both)."""
    store = (
        {"store_path": tmp_path / "review.sqlite3"}
        if request.param == "sqlite"
        else {"store_url": request.getfixturevalue("postgres_url")}
    )
    settings = load_settings(
        review={**store, "flows_file": write_flows(tmp_path), "port": 0, "housekeeping_interval_s": 0.1}
    )
    server = ReviewServer(settings.review)
    await server.start(port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, pb_grpc.ReviewStub(channel)
    await server.stop()


# The service tests of test_review_service.py, collected here again with the fixture above: on SQLite (as
# there) and on PostgreSQL. Their kill -9 test is SQLite's own; the replicas' is below.
test_start_is_idempotent_by_name_and_refuses_other_input = (
    service_tests.test_start_is_idempotent_by_name_and_refuses_other_input
)
test_case_is_pushed_answered_and_written_where_a2i_would = (
    service_tests.test_case_is_pushed_answered_and_written_where_a2i_would
)
test_task_count_two_goes_to_two_different_reviewers = service_tests.test_task_count_two_goes_to_two_different_reviewers
test_expired_lease_goes_to_the_next_reviewer = service_tests.test_expired_lease_goes_to_the_next_reviewer
test_released_case_goes_to_another_reviewer = service_tests.test_released_case_goes_to_another_reviewer
test_stop_and_delete_follow_a2i = service_tests.test_stop_and_delete_follow_a2i


async def test_a_new_case_wakes_one_waiting_stream_not_all(review: tuple[ReviewServer, pb_grpc.ReviewStub]) -> None:
    server, stub = review
    waiters = server.servicer.waiters
    streams = [
        stub.StreamCases(pb.StreamCasesRequest(reviewer_id=f"dr-{i}", flow_definitions=["single"], max_in_flight=1))
        for i in range(20)
    ]
    try:
        deadline = time.monotonic() + 10
        while waiters.waiting("single") < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert waiters.waiting("single") == 20
        before = waiters.wakeups
        await stub.StartHumanLoop(service_tests.start_request("case-w"))
        pending = {asyncio.ensure_future(anext(aiter(s))): s for s in streams}
        done, _ = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        (first,) = done
        assert first.result().human_loop_name == "case-w"
        await asyncio.sleep(0.3)  # long enough for any other stream to have woken and looked
        assert waiters.wakeups - before == 1
        assert waiters.waiting("single") == 19  # the one that took it is full (max_in_flight 1)
        for task in pending:
            task.cancel()
    finally:
        for stream in streams:
            stream.cancel()


async def test_renew_lease_keeps_the_case_while_the_reviewer_works(
    review: tuple[ReviewServer, pb_grpc.ReviewStub],
) -> None:
    _, stub = review
    await stub.StartHumanLoop(service_tests.start_request("case-n"))  # the "single" flow: a 1 s time limit
    case = await next_case(stub, "dr-slow", ["single"])
    for _ in range(4):  # 2 s of work in all, renewed every 0.5 s: the case never goes back to the queue
        await asyncio.sleep(0.5)
        renewed = await stub.RenewLease(pb.RenewLeaseRequest(delivery_id=case.delivery_id, reviewer_id="dr-slow"))
        assert renewed.lease_expires.ToNanoseconds() / 1e9 > time.time() + 0.5
    other = stub.StreamCases(pb.StreamCasesRequest(reviewer_id="dr-other", flow_definitions=["single"]))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await anext(aiter(other))
    other.cancel()
    for request, code in [
        (pb.RenewLeaseRequest(delivery_id=case.delivery_id, reviewer_id="dr-other"), grpc.StatusCode.PERMISSION_DENIED),
        (pb.RenewLeaseRequest(delivery_id="no-such-delivery", reviewer_id="dr-slow"), grpc.StatusCode.NOT_FOUND),
        (pb.RenewLeaseRequest(reviewer_id="dr-slow"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.RenewLease(request)
        assert failure.value.code() == code
    await stub.SubmitReview(
        pb.SubmitReviewRequest(
            decision_id="n-1", delivery_id=case.delivery_id, reviewer_id="dr-slow", answer=pb.ReviewAnswer(accept=True)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.RenewLease(pb.RenewLeaseRequest(delivery_id=case.delivery_id, reviewer_id="dr-slow"))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_reviewer_client_renews_the_lease_while_it_works(
    review: tuple[ReviewServer, pb_grpc.ReviewStub],
) -> None:
    server, stub = review
    await stub.StartHumanLoop(service_tests.start_request("case-k"))  # 1 s leases, expired every 0.1 s
    case = await next_case(stub, "dr-k", ["single"])

    def look_for_a_while() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with LeaseKeeper(pb_grpc.ReviewStub(channel), case, "dr-k") as keeper:
                time.sleep(2.5)
            return keeper.renewals

    assert await asyncio.to_thread(look_for_a_while) >= 3
    (still_ours,) = await asyncio.to_thread(server.store.open_deliveries, "dr-k")
    assert still_ours.delivery_id == case.delivery_id  # never expired, never given to anyone else


async def test_with_tokens_only_the_lease_holder_renews(tmp_path: Path) -> None:
    settings, key = token_settings(tmp_path)
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    tokens = Tokens(key)
    dr_a, dr_b = tokens.metadata("dr-a"), tokens.metadata("dr-b")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReviewStub(channel)
            await stub.StartHumanLoop(
                service_tests.start_request("case-t"), metadata=tokens.metadata("gw", Role.ROUTER)
            )
            stream = stub.StreamCases(pb.StreamCasesRequest(flow_definitions=["single"]), metadata=dr_a)
            case = await anext(aiter(stream))
            stream.cancel()
            renew = pb.RenewLeaseRequest(delivery_id=case.delivery_id)
            assert (await stub.RenewLease(renew, metadata=dr_a)).lease_expires.seconds > 0
            for request, metadata, code in [
                (renew, dr_b, grpc.StatusCode.PERMISSION_DENIED),  # another reviewer's case
                (
                    pb.RenewLeaseRequest(delivery_id=case.delivery_id, reviewer_id="dr-a"),
                    dr_b,
                    grpc.StatusCode.PERMISSION_DENIED,  # naming someone else
                ),
                (renew, (), grpc.StatusCode.UNAUTHENTICATED),
                (renew, tokens.metadata("gw", Role.ROUTER), grpc.StatusCode.PERMISSION_DENIED),  # not a reviewer
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.RenewLease(request, metadata=metadata)
                assert failure.value.code() == code
    finally:
        await server.stop()


# ------------------------------------------------------------------------------------------------
# Two replicas on one PostgreSQL, 1,000 routed cases, 20 reviewers, kill -9 of one replica mid-run.

REPLICA_FLOWS = """
[[flows]]
name = "replicated"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 120
"""
CASES = 1000
REVIEWERS = 20
KILL_AFTER = 400  # acknowledged decisions before replica 0 is killed


@dataclass
class Replica:
    target: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "review", "serve"],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[list[Replica]]:
    flows = tmp_path / "flows.toml"
    flows.write_text(REPLICA_FLOWS)
    started: list[Replica] = []
    for index in range(2):
        port = free_port()
        env = dict(
            os.environ,
            MEDGATE_REVIEW_STORE_URL=postgres_url,
            MEDGATE_REVIEW_STORE_PATH=str(tmp_path / f"unused-{index}.sqlite3"),
            MEDGATE_REVIEW_FLOWS_FILE=str(flows),
            MEDGATE_REVIEW_PORT=str(port),
            MEDGATE_REVIEW_HOUSEKEEPING_INTERVAL_S="0.5",
        )
        started.append(Replica(f"127.0.0.1:{port}", env))
    for replica in started:
        replica.spawn()
    yield started
    for replica in started:
        if replica.process is not None and replica.process.poll() is None:
            replica.process.kill()
            replica.process.wait()


@dataclass
class Tally:
    acknowledged: dict[str, str] = field(default_factory=dict)  # loop -> reviewer, once SubmitReview answered OK
    received: Counter[str] = field(default_factory=Counter)  # loop -> deliveries a reviewer got (re-sends count)
    reconnects: int = 0
    served_by: Counter[str] = field(default_factory=Counter)  # replica target -> decisions acknowledged there


def _content(name: str) -> str:
    return json.dumps({"inputHash": name, "classification": {"scores": [{"label": "lesion", "score": 0.6}]}})


async def _route(targets: list[str]) -> int:
    """The gateway's part: StartHumanLoop for every case, round-robin over the replicas, retried on the other
    one when a replica is gone (idempotent by loop name). Eight in flight."""
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [pb_grpc.ReviewStub(c) for c in channels]
    retries = 0

    async def one(index: int) -> None:
        nonlocal retries
        name = f"case-{index:04d}"
        request = pb.StartHumanLoopRequest(name=name, flow_definition="replicated", input_content_json=_content(name))
        for attempt in range(40):
            try:
                await stubs[(index + attempt) % len(stubs)].StartHumanLoop(request, timeout=5)
                return
            except grpc.aio.AioRpcError:
                retries += 1
                await asyncio.sleep(0.05)
        raise AssertionError(f"{name} could not be routed")

    queue = iter(range(CASES))

    async def worker() -> None:
        for index in queue:
            await one(index)

    await asyncio.gather(*(worker() for _ in range(8)))
    for channel in channels:
        await channel.close()
    return retries


async def _review(name: str, targets: list[str], first: int, tally: Tally, stop: asyncio.Event) -> None:
    """One reviewer, as ``medgate reviewer --auto`` works: stream, answer, and when the replica is gone,
    reconnect to the next one and send again the decision that got no answer (same decision id)."""
    unanswered: pb.SubmitReviewRequest | None = None
    index = first
    while not stop.is_set():
        target = targets[index % len(targets)]
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.ReviewStub(channel)
                if unanswered is not None:
                    result = await stub.SubmitReview(unanswered, timeout=10)
                    tally.acknowledged.setdefault(result.human_loop.name, name)
                    tally.served_by[target] += 1
                    unanswered = None
                stream = stub.StreamCases(
                    pb.StreamCasesRequest(reviewer_id=name, flow_definitions=["replicated"], max_in_flight=2)
                )
                async for case in stream:
                    tally.received[case.human_loop_name] += 1
                    unanswered = pb.SubmitReviewRequest(
                        decision_id=decision_id(name, case.human_loop_name),
                        delivery_id=case.delivery_id,
                        reviewer_id=name,
                        answer=pb.ReviewAnswer(label="normal"),
                    )
                    result = await stub.SubmitReview(unanswered, timeout=10)
                    unanswered = None
                    tally.acknowledged.setdefault(case.human_loop_name, name)
                    tally.served_by[target] += 1
                    if stop.is_set():
                        break
        except grpc.aio.AioRpcError:
            tally.reconnects += 1
            index += 1  # the next replica
            await asyncio.sleep(0.05)


def _completed(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM loops WHERE status = 'Completed'").fetchone()
        return int(row[0]) if row else 0


async def test_two_replicas_kill_9_loses_nothing_and_duplicates_nothing(
    replicas: list[Replica], postgres_url: str
) -> None:
    for replica in replicas:
        await asyncio.to_thread(wait_serving, replica.target)
    targets = [replica.target for replica in replicas]
    tally = Tally()
    stop = asyncio.Event()
    started = time.monotonic()
    reviewers = [
        asyncio.create_task(_review(f"dr-{i:02d}", targets, i % 2, tally, stop)) for i in range(REVIEWERS)
    ]  # ten on each replica
    routing = asyncio.create_task(_route(targets))

    while len(tally.acknowledged) < KILL_AFTER and time.monotonic() - started < 60:
        await asyncio.sleep(0.01)
    killed = replicas[0].process
    assert killed is not None
    killed.send_signal(signal.SIGKILL)
    await asyncio.to_thread(killed.wait)
    killed_at = len(tally.acknowledged)
    assert 0 < killed_at < CASES

    route_retries = await asyncio.wait_for(routing, 60)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and await asyncio.to_thread(_completed, postgres_url) < CASES:
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    stop.set()
    for task in reviewers:
        task.cancel()
    await asyncio.gather(*reviewers, return_exceptions=True)

    with psycopg.connect(postgres_url) as conn:
        loops = conn.execute("SELECT name, status, answers FROM loops").fetchall()
        decisions = conn.execute(
            "SELECT l.name, d.reviewer, d.id FROM decisions AS d JOIN loops AS l ON l.seq = d.loop_seq"
        ).fetchall()
    assert len(loops) == CASES  # every routed case arrived once, whichever replica took it
    assert all(status == "Completed" and answers == 1 for _, status, answers in loops)
    per_loop = Counter(name for name, _, _ in decisions)
    assert len(per_loop) == CASES and max(per_loop.values()) == 1  # 0 duplicate decisions
    recorded = {name: (reviewer, decision) for name, reviewer, decision in decisions}
    for loop_name, reviewer in tally.acknowledged.items():  # 0 acknowledged decisions lost
        assert recorded[loop_name] == (reviewer, decision_id(reviewer, loop_name))
    assert tally.reconnects >= REVIEWERS // 2  # the killed replica's reviewers moved over
    assert tally.served_by[targets[1]] > 0 and len(tally.acknowledged) > killed_at
    resent = sum(count - 1 for count in tally.received.values() if count > 1)
    print(
        f"\n{CASES} cases, {REVIEWERS} reviewers, 2 replicas, kill -9 after {killed_at} decisions: all Completed in"
        f" {elapsed:.1f} s; {tally.reconnects} reconnects, {route_retries} routing retries, {resent} cases sent"
        f" again (at-least-once), 0 lost, 0 duplicates"
    )


async def test_with_a_backlog_every_reviewer_keeps_getting_cases(
    review: tuple[ReviewServer, pb_grpc.ReviewStub],
) -> None:
    """Cases queued before anyone listened raise no new-case event, so a stream that leased nothing while work
    was queued must look again soon (BUSY_RECHECK_S) rather than wait for one. bench_review --decisions saw
    reviewers idle for a whole run with 3,000 cases queued on two replicas; in one process this test has not
    reproduced that stall, so it guards the property (every reviewer served, no 30 s wait), not the cause."""
    _, stub = review
    cases, reviewers = 300, 20
    for i in range(cases):
        await stub.StartHumanLoop(service_tests.start_request(f"backlog-{i}"))
    decided: Counter[str] = Counter()
    longest_wait: dict[str, float] = {}

    async def work(reviewer: str) -> None:
        stream = stub.StreamCases(
            pb.StreamCasesRequest(reviewer_id=reviewer, flow_definitions=["single"], max_in_flight=1)
        )
        waited_since = time.monotonic()
        try:
            async for case in stream:
                longest_wait[reviewer] = max(longest_wait.get(reviewer, 0.0), time.monotonic() - waited_since)
                await stub.SubmitReview(
                    pb.SubmitReviewRequest(
                        decision_id=f"{reviewer}-{case.delivery_id}",
                        delivery_id=case.delivery_id,
                        reviewer_id=reviewer,
                        answer=pb.ReviewAnswer(label="normal"),
                    )
                )
                decided[reviewer] += 1
                waited_since = time.monotonic()
        finally:
            stream.cancel()

    tasks = [asyncio.create_task(work(f"dr-{i}")) for i in range(reviewers)]
    deadline = time.monotonic() + 60
    while sum(decided.values()) < cases and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(decided.values()) >= cases, decided
    assert set(decided) == {f"dr-{i}" for i in range(reviewers)}, decided  # nobody starved
    assert max(longest_wait.values()) < 5.0, longest_wait  # the idle re-check is 30 s: none waited for it
