"""Routing to review off the caller's path, and stage timings that account for every millisecond.

Two real gateways on the session's Triton, one routing every classification to a real review service, one
not routing at all: a routed Classify says ``queued`` with its loop name, reaches the review service anyway
(with a compressed image) and leaves the outbox; the answers' stage timings add up to their totals. What a
routed call costs against an unrouted one (the 1.2x target) is a benchmark, measured on a quiet machine:
``python -m bench.bench_supervision --skip recovery`` (bench/results/supervision.json); here the ratio is
only printed, since a shared CI machine's noise is larger than the margin.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.routing import outbox_request
from services.gateway.server import GatewayServer
from services.imaging.limits import IngestLimits
from services.imaging.prepare import prepare
from services.review.outbox import unpack
from services.review.server import ReviewServer
from services.review.store import NotFound
from services.settings import Settings, load_settings
from tests.conftest import free_port
from tests.fixtures import phantom, png_bytes, pydicom_data_file

pytestmark = pytest.mark.triton

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

CALLS = 15


def _settings(tmp: Path, *, review: bool, review_port: int) -> Settings:
    flows = tmp / "flows.toml"
    flows.write_text(FLOWS)
    return load_settings(
        gateway={"port": 0, "metrics_port": 0, "http_enabled": False},
        review={
            "enabled": review,
            "url": f"127.0.0.1:{review_port}",
            "port": review_port,
            "web_enabled": False,
            "flows_file": flows,
            "store_path": tmp / "review.sqlite3",
            "outbox_dir": tmp / "outbox",
            "outbox_retry_interval_s": 0.5,
            "housekeeping_interval_s": 0.5,
        },
        report={"enabled": False},
    )


@pytest.fixture(scope="module")
async def servers(
    triton_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[GatewayServer, GatewayServer, ReviewServer, Settings]]:
    tmp = tmp_path_factory.mktemp("routing")
    port = free_port()
    routed_settings = _settings(tmp, review=True, review_port=port)
    review = ReviewServer(routed_settings.review, routed_settings.security)
    await review.start()
    routed = GatewayServer(routed_settings, triton_url)
    plain = GatewayServer(_settings(tmp_path_factory.mktemp("plain"), review=False, review_port=port), triton_url)
    await routed.start(port=0)
    await plain.start(port=0)
    yield routed, plain, review, routed_settings
    await routed.stop()
    await plain.stop()
    await review.stop()


def _images(count: int, *, start: int) -> list[bytes]:
    """Distinct 1024x1024 radiographs (distinct hashes: each routed call is a new case), the same for both sides."""
    return [png_bytes(phantom(start + i).image) for i in range(count)]


async def _classify(stub: pb_grpc.InferenceStub, data: bytes) -> tuple[float, pb.ClassifyResponse]:
    started = time.perf_counter()
    answer = await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=data)), timeout=60)
    return time.perf_counter() - started, answer


def _stages_ms(timings: pb.StageTimings) -> float:
    return (
        timings.decode_ms
        + timings.preprocess_ms
        + timings.triton_ms
        + timings.encode_ms
        + timings.dicom_ms
        + timings.route_ms
    )


def _assert_adds_up(timings: pb.StageTimings) -> None:
    # "within a few percent": what is left is building the answer (sorting scores, protobuf), well under a ms.
    assert abs(timings.total_ms - _stages_ms(timings)) <= 0.05 * timings.total_ms + 1.0, timings


async def test_a_routed_classify_is_queued_reaches_review_and_its_stages_add_up(
    servers: tuple[GatewayServer, GatewayServer, ReviewServer, Settings],
) -> None:
    routed, plain, review, settings = servers
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{routed.port}") as routed_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{plain.port}") as plain_channel,
    ):
        routed_stub, plain_stub = pb_grpc.InferenceStub(routed_channel), pb_grpc.InferenceStub(plain_channel)
        for data in _images(2, start=900):  # warm both paths (executor threads, channels, the review service)
            await _classify(routed_stub, data)
            await _classify(plain_stub, data)
        routed_s: list[float] = []
        plain_s: list[float] = []
        route_ms: list[float] = []
        answers: list[pb.ClassifyResponse] = []
        for i, data in enumerate(_images(CALLS, start=1000)):
            # Interleaved, and alternating which goes first: both sides see the same noise of a shared machine.
            pair = [(routed_stub, routed_s), (plain_stub, plain_s)]
            for stub, took in pair if i % 2 == 0 else pair[::-1]:
                seconds, answer = await _classify(stub, data)
                took.append(seconds)
                if stub is routed_stub:
                    answers.append(answer)
                    route_ms.append(answer.timings.route_ms)
                else:
                    assert not answer.review and answer.timings.route_ms == 0.0
                _assert_adds_up(answer.timings)
    ratio = statistics.median(routed_s) / statistics.median(plain_s)
    print(
        f"Classify p50 routed {statistics.median(routed_s) * 1000:.1f} ms, unrouted"
        f" {statistics.median(plain_s) * 1000:.1f} ms (x{ratio:.2f});"
        f" route stage p50 {statistics.median(route_ms):.1f} ms"
    )

    # Honest entries: each answer says its case was handed off (queued) under its loop name...
    for answer in answers:
        (entry,) = answer.review
        assert entry.queued and not entry.routed and entry.human_loop_name and entry.flow_definition == "always"
        assert entry.reasons[-1] == "queued"
    # ...and every case reaches the review service, with a compressed PNG, and leaves the outbox.
    deadline = time.monotonic() + 30
    for answer in answers:
        name = answer.review[0].human_loop_name
        while True:
            try:
                review.store.describe(name)
                break
            except NotFound:
                assert time.monotonic() < deadline, f"{name} never reached the review service"
                await asyncio.sleep(0.1)
        png = review.store.images(name)["image.png"]
        assert png[:4] == b"\x89PNG" and len(png) < 1024 * 1024  # compressed on the way, not the outbox's copy
    while list(settings.review.outbox_dir.glob("*.pending")):
        assert time.monotonic() < deadline, "handed-off cases stayed in the outbox"
        await asyncio.sleep(0.1)


async def test_an_image_already_in_review_is_answered_routed(
    servers: tuple[GatewayServer, GatewayServer, ReviewServer, Settings],
) -> None:
    routed, _, review, _ = servers
    data = _images(1, start=2000)[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{routed.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        _, first = await _classify(stub, data)
        (entry,) = first.review
        assert entry.queued
        deadline = time.monotonic() + 30
        while True:
            _, again = await _classify(stub, data)
            if again.review[0].routed:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    (entry,) = again.review
    assert not entry.queued and entry.reasons[-1] == "already in review"
    assert entry.human_loop_name == first.review[0].human_loop_name
    review.store.describe(entry.human_loop_name)


async def test_the_hand_off_is_on_disk_when_the_answer_leaves(triton_url: str, tmp_path: Path) -> None:
    """The review service is not there at all: the case is in the outbox, fsynced, the moment the caller has the
    answer: the request beside the smaller of the caller's own file and the model image's raw pixels (no PNG
    built on the caller's time), from which the retries rebuild the review image the gateway's model saw."""
    settings = _settings(tmp_path, review=True, review_port=free_port())  # nothing listens there
    gateway = GatewayServer(settings, triton_url)
    await gateway.start(port=0)
    radiograph = _images(1, start=3000)[0]  # a 16-bit PNG of 1.4 MB: its 1 MiB model image is kept
    model_image = prepare(radiograph, limits=IngestLimits()).model_image
    small = png_bytes(model_image)  # the same as an 8-bit 1024x1024 PNG under 1 MiB: kept as it came
    paths = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            for data, form in ((radiograph, "model"), (small, "input")):
                _, answer = await _classify(pb_grpc.InferenceStub(channel), data)
                (entry,) = answer.review
                assert entry.queued
                path = settings.review.outbox_dir / f"{entry.human_loop_name}.pending"
                payload = path.read_bytes()
                assert unpack(payload).image == form
                assert len(payload) < min(len(data), model_image.nbytes) + 64 * 1024
                request = outbox_request(payload)  # what the retries send
                assert request.name == entry.human_loop_name and request.flow_definition == "always"
                image = cv2.imdecode(np.frombuffer(request.image_png, np.uint8), cv2.IMREAD_UNCHANGED)
                assert np.array_equal(image, model_image)
                paths.append(path)
    finally:
        await gateway.stop()
    # Stopping leaves what the service has not taken in the outbox: nothing lost.
    assert all(path.exists() for path in paths)


async def test_stage_timings_add_up_for_every_rpc(
    servers: tuple[GatewayServer, GatewayServer, ReviewServer, Settings],
) -> None:
    routed, _, _, _ = servers
    data = pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    image = pb.ImageInput(data=data)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{routed.port}", options=_big()) as channel:
        stub = pb_grpc.InferenceStub(channel)
        answers: list[Any] = [
            await stub.Classify(pb.ClassifyRequest(image=image), timeout=60),
            await stub.Detect(pb.DetectRequest(image=image), timeout=60),
            await stub.Segment(pb.SegmentRequest(image=image, prompts="heart & left lung"), timeout=120),
            await stub.Analyze(pb.AnalyzeRequest(image=image, prompts="heart"), timeout=120),
            await stub.Classify(
                pb.ClassifyRequest(image=image, output=pb.OutputOptions(dicom_results=True)), timeout=60
            ),
        ]
    for answer in answers:
        timings = answer.timings
        assert timings.total_ms > 0 and timings.triton_ms > 0
        _assert_adds_up(timings)
    analyze = answers[3].timings
    assert analyze.triton_ms < analyze.total_ms  # side-by-side model calls count once
    assert answers[4].timings.dicom_ms > 0 and answers[0].timings.route_ms > 0


def _big() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 256 << 20)]
