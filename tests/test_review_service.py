"""The review service as reviewers and integrators use it: real gRPC, real SQLite, a real kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from clients.reviewer import decision_id
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.review.store import ReviewStore
from services.settings import load_settings
from tests.conftest import free_port

FLOWS = """
[[flows]]
name = "single"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 1
output_dir = "out"
activation_conditions = '''
{"ConditionType": "ConfidenceLessThan", "ConditionParameters": {"Score": "top_class", "ConfidenceLessThan": 0.9}}
'''

[[flows]]
name = "double"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 2
task_time_limit_s = 60
output_dir = "out"
"""


def write_flows(root: Path) -> Path:
    path = root / "flows.toml"
    path.write_text(FLOWS)
    return path


@pytest.fixture
async def review(tmp_path: Path) -> AsyncIterator[tuple[ReviewServer, pb_grpc.ReviewStub]]:
    settings = load_settings(
        review={
            "store_path": tmp_path / "review.sqlite3",
            "flows_file": write_flows(tmp_path),
            "port": 0,
            "housekeeping_interval_s": 0.1,
        }
    )
    server = ReviewServer(settings.review)
    await server.start(port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, pb_grpc.ReviewStub(channel)
    await server.stop()


def start_request(name: str, flow: str = "single", score: float = 0.6) -> pb.StartHumanLoopRequest:
    content = {
        "inputHash": name,
        "classification": {"scores": [{"label": "lesion", "score": score}, {"label": "normal", "score": 1 - score}]},
        "transform": {"originalWidth": 2000, "originalHeight": 1800},
    }
    return pb.StartHumanLoopRequest(
        name=name, flow_definition=flow, input_content_json=json.dumps(content), image_png=b"\x89PNG-fake"
    )


async def next_case(stub: pb_grpc.ReviewStub, reviewer: str, flows: list[str], timeout: float = 10) -> pb.ReviewCase:
    stream = stub.StreamCases(pb.StreamCasesRequest(reviewer_id=reviewer, flow_definitions=flows, max_in_flight=1))
    try:
        async for case in stream:
            return case
        raise AssertionError("stream ended without a case")
    finally:
        stream.cancel()


@pytest.mark.parametrize(
    ("answer", "modified"),
    [
        (pb.ReviewAnswer(label="lesion"), False),
        (pb.ReviewAnswer(accept=True), False),
        (pb.ReviewAnswer(label="normal"), True),
    ],
    ids=["the-models-class", "accepted", "another-class"],
)
async def test_a_grpc_reviewer_who_keeps_the_models_class_did_not_modify_it(
    review: tuple[ReviewServer, pb_grpc.ReviewStub], tmp_path: Path, answer: pb.ReviewAnswer, modified: bool
) -> None:
    """A2I's initialValueModified in output.json, judged by the service for gRPC answers as for the page's."""
    _, stub = review
    await stub.StartHumanLoop(start_request("case-m"))  # the model: lesion 0.6
    case = await next_case(stub, "dr-a", ["single"])
    request = pb.SubmitReviewRequest(decision_id="d-m", delivery_id=case.delivery_id, reviewer_id="dr-a", answer=answer)
    result = await stub.SubmitReview(request)
    document = json.loads((tmp_path / "out" / result.human_loop.output_path).read_text())
    assert document["humanAnswers"][0]["answerContent"]["initialValueModified"] is modified


async def test_start_is_idempotent_by_name_and_refuses_other_input(
    review: tuple[ReviewServer, pb_grpc.ReviewStub],
) -> None:
    _, stub = review
    first = await stub.StartHumanLoop(start_request("case-1"))
    again = await stub.StartHumanLoop(start_request("case-1"))
    assert first == again and first.status == pb.HUMAN_LOOP_STATUS_IN_PROGRESS
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.StartHumanLoop(start_request("case-1", score=0.3))
    assert failure.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.StartHumanLoop(start_request("case-2", flow="nope"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_case_is_pushed_answered_and_written_where_a2i_would(
    review: tuple[ReviewServer, pb_grpc.ReviewStub], tmp_path: Path
) -> None:
    _, stub = review
    await stub.StartHumanLoop(start_request("case-a"))
    case = await next_case(stub, "dr-a", ["single"])
    assert case.human_loop_name == "case-a" and list(case.categories) == ["normal", "lesion"]
    assert [s.label for s in case.scores] == ["lesion", "normal"] and case.image_png == b"\x89PNG-fake"
    answer = pb.ReviewAnswer(label="normal", comment="no nodule")
    request = pb.SubmitReviewRequest(decision_id="d-1", delivery_id=case.delivery_id, reviewer_id="dr-a", answer=answer)
    result = await stub.SubmitReview(request)
    assert result.recorded_now and result.human_loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED
    replay = await stub.SubmitReview(request)
    assert not replay.recorded_now and replay.human_loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SubmitReview(
            pb.SubmitReviewRequest(
                decision_id="d-1",
                delivery_id=case.delivery_id,
                reviewer_id="dr-a",
                answer=pb.ReviewAnswer(label="lesion"),
            )
        )
    assert failure.value.code() == grpc.StatusCode.ALREADY_EXISTS
    key = Path(result.human_loop.output_path)  # A2I's key under the flow's output folder, never a server path
    assert not key.is_absolute() and key.parts[0] == "single" and key.name == "output.json"
    assert len(key.parts) == 9 and key.parts[7] == "case-a"  # <flow>/YYYY/MM/DD/hh/mm/ss/<loop>/output.json
    output = tmp_path / "out" / key
    assert output.is_file()
    document = json.loads(output.read_text())
    assert document["humanLoopName"] == "case-a"
    assert document["humanAnswers"][0]["answerContent"] == {
        "label": "normal",
        "comment": "no nodule",
        "initialValueModified": True,  # the model said lesion
    }
    assert document["humanAnswers"][0]["workerId"] == "dr-a"
    assert document["inputContent"]["classification"]["scores"][0]["label"] == "lesion"


async def test_task_count_two_goes_to_two_different_reviewers(review: tuple[ReviewServer, pb_grpc.ReviewStub]) -> None:
    _, stub = review
    await stub.StartHumanLoop(start_request("case-d", flow="double"))
    first = await next_case(stub, "dr-1", ["double"])
    await stub.SubmitReview(
        pb.SubmitReviewRequest(
            decision_id="x1", delivery_id=first.delivery_id, reviewer_id="dr-1", answer=pb.ReviewAnswer(accept=True)
        )
    )
    # dr-1 already answered: a new stream for dr-1 gets nothing; dr-2 gets the same case.
    second = await next_case(stub, "dr-2", ["double"])
    assert second.human_loop_name == "case-d" and second.delivery_id != first.delivery_id
    stream = stub.StreamCases(pb.StreamCasesRequest(reviewer_id="dr-1", flow_definitions=["double"]))
    with pytest.raises(TimeoutError):
        async with asyncio_timeout(0.5):
            await anext(aiter(stream))
    stream.cancel()
    done = await stub.SubmitReview(
        pb.SubmitReviewRequest(
            decision_id="x2", delivery_id=second.delivery_id, reviewer_id="dr-2", answer=pb.ReviewAnswer(label="lesion")
        )
    )
    assert done.human_loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED and done.human_loop.answers == 2


async def test_expired_lease_goes_to_the_next_reviewer(review: tuple[ReviewServer, pb_grpc.ReviewStub]) -> None:
    _, stub = review
    await stub.StartHumanLoop(start_request("case-e"))
    leased = await next_case(stub, "dr-slow", ["single"])
    started = time.monotonic()
    again = await next_case(stub, "dr-fast", ["single"])  # pushed when the 1 s lease runs out
    assert again.human_loop_name == "case-e" and again.delivery_id != leased.delivery_id
    assert 0.5 < time.monotonic() - started < 8


async def test_released_case_goes_to_another_reviewer(review: tuple[ReviewServer, pb_grpc.ReviewStub]) -> None:
    _, stub = review
    await stub.StartHumanLoop(start_request("case-r", flow="double"))
    case = await next_case(stub, "dr-x", ["double"])
    await stub.ReleaseCase(pb.ReleaseCaseRequest(delivery_id=case.delivery_id, reviewer_id="dr-x"))
    other = await next_case(stub, "dr-y", ["double"])
    assert other.human_loop_name == "case-r"


async def test_stop_and_delete_follow_a2i(review: tuple[ReviewServer, pb_grpc.ReviewStub]) -> None:
    _, stub = review
    await stub.StartHumanLoop(start_request("case-s"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.DeleteHumanLoop(pb.DeleteHumanLoopRequest(name="case-s"))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stopped = await stub.StopHumanLoop(pb.StopHumanLoopRequest(name="case-s"))
    assert stopped.status == pb.HUMAN_LOOP_STATUS_STOPPED
    listed = await stub.ListHumanLoops(pb.ListHumanLoopsRequest(flow_definition="single"))
    assert [loop.name for loop in listed.human_loops] == ["case-s"]
    await stub.DeleteHumanLoop(pb.DeleteHumanLoopRequest(name="case-s"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="case-s"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def asyncio_timeout(seconds: float):  # type: ignore[no-untyped-def]
    import asyncio

    return asyncio.timeout(seconds)


# ------------------------------------------------------------------------------------------------
# kill -9 in the middle of 200 cases with 5 reviewer clients


@pytest.fixture
def review_process(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], str, Path, dict[str, str]]]:
    port = free_port()
    env = dict(
        os.environ,
        MEDGATE_REVIEW_STORE_PATH=str(tmp_path / "review.sqlite3"),
        MEDGATE_REVIEW_FLOWS_FILE=str(write_flows(tmp_path)),
        MEDGATE_REVIEW_PORT=str(port),
        MEDGATE_REVIEW_HOUSEKEEPING_INTERVAL_S="0.2",
    )
    processes: list[subprocess.Popen[bytes]] = []
    yield processes, f"127.0.0.1:{port}", tmp_path, env
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def spawn_review(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "review", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_serving(target: str, timeout: float = 30) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("review service did not start")


def test_kill_9_mid_review_loses_nothing_and_duplicates_nothing(
    review_process: tuple[list[subprocess.Popen[bytes]], str, Path, dict[str, str]],
) -> None:
    processes, target, root, env = review_process
    processes.append(spawn_review(env))
    wait_serving(target)
    total = 200
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ReviewStub(channel)
        for index in range(total):
            stub.StartHumanLoop(start_request(f"case-{index:03d}"), timeout=10)

    acknowledged: dict[str, str] = {}  # loop -> reviewer, as the clients saw their decisions recorded
    lock = threading.Lock()
    stop = threading.Event()
    streams: dict[str, grpc.Future] = {}

    def reviewer(name: str) -> None:
        while not stop.is_set():
            try:
                with grpc.insecure_channel(target) as channel:
                    stub = pb_grpc.ReviewStub(channel)
                    stream = stub.StreamCases(
                        pb.StreamCasesRequest(reviewer_id=name, flow_definitions=["single"], max_in_flight=2)
                    )
                    with lock:
                        streams[name] = stream
                    for case in stream:
                        stub.SubmitReview(
                            pb.SubmitReviewRequest(
                                decision_id=decision_id(name, case.human_loop_name),
                                delivery_id=case.delivery_id,
                                reviewer_id=name,
                                answer=pb.ReviewAnswer(label="normal"),
                            ),
                            timeout=10,
                        )
                        with lock:
                            acknowledged.setdefault(case.human_loop_name, name)
                        if stop.is_set():
                            return
            except grpc.RpcError:
                time.sleep(0.2)  # the server is down: reconnect, as medgate reviewer does

    threads = [threading.Thread(target=reviewer, args=(f"dr-{i}",), daemon=True) for i in range(5)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait()
    killed_at = len(acknowledged)
    assert 0 < killed_at < total
    processes.append(spawn_review(env))
    wait_serving(target)
    deadline = time.monotonic() + 120
    with ReviewStore(root / "review.sqlite3", owner=False) as watcher:
        while time.monotonic() < deadline:
            page, token = watcher.list(flow="single", status="InProgress", max_results=1)
            if not page:
                break
            time.sleep(0.1)
    stop.set()
    with lock:
        for stream in streams.values():
            stream.cancel()
    for thread in threads:
        thread.join(timeout=15)
    processes[1].send_signal(signal.SIGTERM)
    processes[1].wait(timeout=30)

    with ReviewStore(root / "review.sqlite3") as store:
        loops, token = store.list(flow="single", max_results=100)
        while token:
            more, token = store.list(flow="single", max_results=100, next_token=token)
            loops.extend(more)
        assert len(loops) == total
        assert all(loop.status == "Completed" and loop.answers == 1 for loop in loops)
        for loop_name, reviewer_name in acknowledged.items():
            decisions = store.decisions(loop_name)
            assert len(decisions) == 1, loop_name  # never a duplicate
            assert decisions[0].reviewer_id == reviewer_name  # never lost once acknowledged
    # A decision committed just before the kill may never have reached its client: that is the
    # at-least-once edge, and the store still holds it exactly once (checked above).
    assert len(acknowledged) > killed_at
