"""The review service answers through the same RPC layer as the gateway: request ids, access log, incident ids.

Runs a real review server on loopback (no Triton needed).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.settings import load_settings
from tests.test_review_service import start_request, write_flows


@pytest.fixture
async def review(tmp_path: Path) -> AsyncIterator[tuple[ReviewServer, pb_grpc.ReviewStub]]:
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": write_flows(tmp_path), "port": 0}
    )
    server = ReviewServer(settings.review)
    await server.start(port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, pb_grpc.ReviewStub(channel)
    await server.stop()


async def _access_lines(caplog: pytest.LogCaptureFixture, rpc: str) -> list[logging.LogRecord]:
    """The access-log lines of ``rpc``; the server writes them just after the caller has its answer."""
    for _ in range(100):
        lines = [r for r in caplog.records if getattr(r, "event", "") == "rpc" and r.__dict__["rpc"] == rpc]
        if lines:
            return lines
        await asyncio.sleep(0.02)
    return []


async def test_every_review_call_is_logged_once_with_its_code_and_request_id(
    review: tuple[ReviewServer, pb_grpc.ReviewStub], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medgate.review")
    _, stub = review
    call = stub.StartHumanLoop(start_request("loop-a"), metadata=(("x-request-id", "router-7"),))
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "router-7"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="no-such-loop"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    minted = dict(missing.value.trailing_metadata() or ())["x-request-id"]
    (started,) = await _access_lines(caplog, "StartHumanLoop")
    assert started.__dict__["code"] == "OK" and started.__dict__["request_id"] == "router-7"
    assert started.name == "medgate.review" and started.__dict__["service"] == "medgate.v1.Review"
    (described,) = await _access_lines(caplog, "DescribeHumanLoop")
    assert described.__dict__["code"] == "NOT_FOUND" and described.__dict__["request_id"] == minted


async def test_a_bug_in_the_review_service_is_internal_with_an_incident_id_and_it_keeps_serving(
    review: tuple[ReviewServer, pb_grpc.ReviewStub], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection (a fake): the real store cannot be made to raise a bug on demand, so one method is replaced."""
    caplog.set_level(logging.INFO)
    server, stub = review

    leaked = "store exploded while reading " + "Jane Doe" + "'s loop"  # built so no source line quotes it

    def broken(name: str) -> None:
        raise RuntimeError(leaked)

    monkeypatch.setattr(server.store, "describe", broken)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="loop-x"))
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    incident = re.fullmatch(r"internal error \(incident ([0-9a-f]{12})\)", failure.value.details() or "")
    assert incident is not None, failure.value.details()
    assert any(incident.group(1) in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert "Jane Doe" not in caplog.text
    monkeypatch.undo()
    assert (await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest())).flow_definitions


async def test_review_bad_requests_name_the_field(review: tuple[ReviewServer, pb_grpc.ReviewStub]) -> None:
    _, stub = review
    for call, field in (
        (stub.ListHumanLoops(pb.ListHumanLoopsRequest(status=42)), "status"),  # type: ignore[arg-type]
        (stub.ListHumanLoops(pb.ListHumanLoopsRequest(max_results=-3)), "max_results"),
        (stub.SubmitReview(pb.SubmitReviewRequest()), "delivery_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (refused.value.details() or ""), field
    stream = stub.StreamCases(pb.StreamCasesRequest(reviewer_id=""))
    with pytest.raises(grpc.aio.AioRpcError) as no_reviewer:
        async for _ in stream:
            pass
    assert no_reviewer.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reviewer_id" in (no_reviewer.value.details() or "")
