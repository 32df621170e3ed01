"""Nothing routed to review is lost when the review service is away: the outbox keeps it and sends it later."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.review.outbox import Outbox, OutboxFull
from services.review.server import ReviewServer
from services.review.store import NotFound
from services.settings import load_settings
from tests.conftest import free_port
from tests.fixtures import phantom, png_bytes

# Every classification goes to review (a 100% sample): routing does not depend on the model.
FLOWS = """
[[flows]]
name = "always"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 60
output_dir = "out"
activation_conditions = '''
{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}
'''
"""


def test_outbox_keeps_replaces_and_sets_aside(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox", max_bytes=100)
    outbox.put("case-a", b"first")
    outbox.put("case-b", b"second")
    outbox.put("case-a", b"again")  # the same loop name replaces its older copy
    entries = outbox.pending()
    assert sorted(e.name for e in entries) == ["case-a", "case-b"]
    assert {e.name: outbox.read(e) for e in entries} == {"case-a": b"again", "case-b": b"second"}
    assert not [p for p in (tmp_path / "outbox").iterdir() if p.name.startswith(".incoming")]
    with pytest.raises(OutboxFull):
        outbox.put("case-c", b"x" * 95)
    with pytest.raises(ValueError):
        outbox.put("../escape", b"x")
    a, b = sorted(entries, key=lambda e: e.name)
    outbox.done(a)
    outbox.done(a)  # another worker got there first: fine
    outbox.refuse(b)
    assert outbox.pending() == [] and outbox.read(a) is None
    assert (tmp_path / "outbox" / "refused" / b.path.name).read_bytes() == b"second"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_case_routed_while_review_is_down_reaches_it_when_it_is_back(
    triton_url: str, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.toml"
    flows.write_text(FLOWS)
    review_port = free_port()  # nothing listens here yet
    settings = load_settings(
        gateway={"port": 0, "metrics_port": -1},
        review={
            "url": f"127.0.0.1:{review_port}",
            "port": review_port,
            "flows_file": flows,
            "store_path": tmp_path / "review.sqlite3",
            "outbox_dir": tmp_path / "outbox",
            "outbox_retry_interval_s": 0.2,
            "route_timeout_s": 1.0,
            "housekeeping_interval_s": 0.2,
        },
    )
    gateway = GatewayServer(settings, triton_url)
    await gateway.start(port=0)
    review: ReviewServer | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.ClassifyRequest(image=pb.ImageInput(data=png_bytes(phantom(12).image)))
            answer = await stub.Classify(request)
            (routing,) = answer.review
            assert routing.queued and not routing.routed and routing.flow_definition == "always"
            kept = list((tmp_path / "outbox").glob("*.pending"))
            assert [p.name for p in kept] == [f"{routing.human_loop_name}.pending"]

            # The review service comes up; the gateway's retries hand it the case.
            review = ReviewServer(settings.review)
            await review.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    loop = review.store.describe(routing.human_loop_name)
                    break
                except NotFound:
                    assert time.monotonic() < deadline, "the kept case never reached the review service"
                    await asyncio.sleep(0.1)
            assert loop.status == "InProgress" and review.store.images(loop.name)["image.png"][:4] == b"\x89PNG"
            while list((tmp_path / "outbox").glob("*.pending")):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

            again = await stub.Classify(request)
            assert again.review[0].routed and again.review[0].human_loop_name == routing.human_loop_name
            assert not again.review[0].queued
    finally:
        await gateway.stop()
        if review is not None:
            await review.stop()
    assert not (tmp_path / "outbox" / "refused").exists()  # nothing was refused
