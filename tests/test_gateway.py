"""The gateway as a PACS integration sees it: real gRPC on loopback, real tritonserver, real DICOM and PNG."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.infer import array_of
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer, health_name
from services.imaging.preprocess import Letterbox
from services.review.server import ReviewServer
from services.security.identity import Role
from tests.conftest import Clients
from tests.fixtures import dicom_bytes, phantom, png_bytes, pydicom_data_file
from training.phantoms import model_space


async def test_health_reports_every_model_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "medgate.v1.Inference", *(health_name(r) for r in ("classifier", "detector"))]:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_classify_png_returns_every_class_and_the_transform(stub: pb_grpc.InferenceStub) -> None:
    sample = phantom(101, lesion_probability=1.0)
    response = await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=png_bytes(sample.image))))
    labels = [s.label for s in response.scores]
    assert {"normal", "lesion"} <= set(labels)
    assert abs(sum(s.score for s in response.scores) - 1.0) < 1e-3
    assert response.top_label == labels[0] == sample.label
    h, w = sample.image.shape
    t = response.transform
    assert (t.original_width, t.original_height, t.model_size) == (w, h, 1024)
    assert abs(t.scale - 1024 / max(h, w)) < 1e-9
    assert response.model.name == "classifier" and response.model.version == "1"
    assert response.image.kind == pb.INPUT_KIND_PNG
    assert response.timings.total_ms >= response.timings.triton_ms > 0


async def test_dicom_radiograph_through_every_task(stub: pb_grpc.InferenceStub) -> None:
    data = pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    request = pb.AnalyzeRequest(
        image=pb.ImageInput(data=data),
        tasks=[pb.TASK_CLASSIFY, pb.TASK_DETECT, pb.TASK_SEGMENT],
        prompts="left lung & right lung & heart",
        boxes=[pb.Box(x0=300, y0=300, x1=900, y1=1200)],
        output=pb.OutputOptions(mask_space=pb.MASK_SPACE_BOTH),
    )
    response = await stub.Analyze(request)
    assert response.image.kind == pb.INPUT_KIND_DICOM
    assert (response.image.width, response.image.height) == (1841, 1955)
    assert response.classification.scores and response.detection.model.name == "detector"
    masks = array_of(response.segmentation.image_features)
    assert masks.shape == (4, 1024, 1024) and masks.dtype == np.uint8
    original = array_of(response.segmentation.original_masks)
    assert original.shape == (4, 1955, 1841)
    assert list(response.segmentation.text_features) == ["lung", "lung", "heart anatomies", "other"]
    assert all(0.0 <= p.score <= 1.0 for p in response.segmentation.prompts)


async def test_segment_json_reads_as_medimageparse(stub: pb_grpc.InferenceStub) -> None:
    sample = phantom(7)
    response = await stub.Segment(
        pb.SegmentRequest(image=pb.ImageInput(data=png_bytes(sample.image)), prompts="left lung & heart")
    )
    document = json.loads(json_format.MessageToJson(response))
    features = document["image_features"] if "image_features" in document else document["imageFeatures"]
    masks = np.frombuffer(base64.b64decode(features["data"]), dtype=features["dtype"]).reshape(features["shape"])
    assert masks.shape == (2, 1024, 1024)
    assert set(np.unique(masks)) <= {0, 1}
    text = document.get("text_features", document.get("textFeatures"))
    assert text == ["lung", "heart anatomies"]


async def test_text_masks_match_the_phantom_anatomy(stub: pb_grpc.InferenceStub) -> None:
    sample = phantom(11)
    truth = model_space(sample)
    response = await stub.Segment(
        pb.SegmentRequest(image=pb.ImageInput(data=dicom_bytes(sample.image)), prompts="Left Lung&heart")
    )
    masks = array_of(response.image_features).astype(bool)
    for mask, key in zip(masks, ["left_lung", "heart"], strict=True):
        expected = truth[key].astype(bool)
        dice = 2 * np.logical_and(mask, expected).sum() / (mask.sum() + expected.sum())
        assert dice > 0.9, key


async def test_box_prompt_mask_lands_on_the_original_grid(stub: pb_grpc.InferenceStub) -> None:
    sample = phantom(23)
    ys, xs = np.nonzero(sample.right_lung)
    box = pb.Box(x0=float(xs.min()), y0=float(ys.min()), x1=float(xs.max() + 1), y1=float(ys.max() + 1))
    response = await stub.Segment(
        pb.SegmentRequest(
            image=pb.ImageInput(data=png_bytes(sample.image)),
            boxes=[box],
            output=pb.OutputOptions(mask_space=pb.MASK_SPACE_BOTH, mask_encoding=pb.ARRAY_ENCODING_PACKBITS),
        )
    )
    model_masks = array_of(response.image_features)
    masks = array_of(response.original_masks)
    assert model_masks.shape == (1, 1024, 1024)
    assert masks.shape == (1, *sample.image.shape)
    t = response.transform
    transform = Letterbox.for_shape(t.original_height, t.original_width)
    assert np.array_equal(masks, transform.mask_to_original(model_masks))
    mask = masks[0].astype(bool)
    dice = 2 * np.logical_and(mask, sample.right_lung).sum() / (mask.sum() + sample.right_lung.sum())
    assert dice > 0.85
    assert response.prompts[0].box == box
    mb = response.prompts[0].mask_box  # the mask's extent, in original pixels, sits inside the prompt box
    assert box.x0 - 2 <= mb.x0 < mb.x1 <= box.x1 + 2 and box.y0 - 2 <= mb.y0 < mb.y1 <= box.y1 + 2


async def test_detect_boxes_map_back_within_a_pixel(stub: pb_grpc.InferenceStub) -> None:
    sample = phantom(5, lesion_probability=1.0)
    response = await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=png_bytes(sample.image)), min_score=0.3))
    assert response.detections
    t = response.transform
    for det in response.detections:
        mb, ob = det.model_box, det.box
        expected = (
            (mb.x0 - t.pad_left) / t.scale,
            (mb.y0 - t.pad_top) / t.scale,
            (mb.x1 - t.pad_left) / t.scale,
            (mb.y1 - t.pad_top) / t.scale,
        )
        clipped = np.clip(expected, 0, [t.original_width, t.original_height] * 2)
        assert np.allclose([ob.x0, ob.y0, ob.x1, ob.y1], clipped, atol=1.0)
    best = response.detections[0].box
    truth = sample.lesion_boxes
    ious = []
    for x0, y0, x1, y1 in truth:
        ix = max(0.0, min(x1, best.x1) - max(x0, best.x0))
        iy = max(0.0, min(y1, best.y1) - max(y0, best.y0))
        inter = ix * iy
        union = (x1 - x0) * (y1 - y0) + (best.x1 - best.x0) * (best.y1 - best.y0) - inter
        ious.append(inter / union)
    assert max(ious) > 0.5


async def test_raw_array_input(stub: pb_grpc.InferenceStub) -> None:
    image = phantom(3).image
    array = pb.NDArray(data=image.astype("<u2").tobytes(), shape=list(image.shape), dtype="uint16")
    response = await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(array=array)))
    assert response.image.kind == pb.INPUT_KIND_ARRAY
    assert (response.transform.original_height, response.transform.original_width) == image.shape


async def test_stream_answers_every_item_and_survives_a_bad_one(stub: pb_grpc.InferenceStub) -> None:
    good = png_bytes(phantom(1).image)

    async def requests() -> AsyncIterator[pb.AnalyzeRequest]:
        for index in range(6):
            data = b"not an image" if index == 3 else good
            yield pb.AnalyzeRequest(
                image=pb.ImageInput(data=data), tasks=[pb.TASK_CLASSIFY], request_id=f"item-{index}"
            )

    answers = {a.request_id: a async for a in stub.AnalyzeStream(requests())}
    assert set(answers) == {f"item-{i}" for i in range(6)}
    assert answers["item-3"].error.code_name == "INVALID_ARGUMENT"
    assert all(answers[f"item-{i}"].response.classification.scores for i in (0, 1, 2, 4, 5))


@pytest.mark.parametrize(
    ("request_factory", "code", "fragment"),
    [
        (lambda: pb.ClassifyRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no image"),
        (
            lambda: pb.ClassifyRequest(image=pb.ImageInput(data=b"\x89PNG garbage")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "",
        ),
        (
            lambda: pb.SegmentRequest(image=pb.ImageInput(data=png_bytes(phantom(1).image)), prompts="heart & & lung"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt 2 of 3 is empty",
        ),
        (
            lambda: pb.SegmentRequest(image=pb.ImageInput(data=png_bytes(phantom(1).image)), prompts="spleen"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown prompt at prompts[0][0]",  # by position: prompts are free text, never quoted back
        ),
        (
            lambda: pb.SegmentRequest(
                image=pb.ImageInput(data=png_bytes(phantom(1).image)), prompts="&".join(["heart"] * 9)
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "limit of 8",
        ),
        (
            lambda: pb.SegmentRequest(
                image=pb.ImageInput(data=png_bytes(phantom(1).image)), boxes=[pb.Box(x0=10, y0=10, x1=10, y1=50)]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "box 1 is empty",
        ),
        (
            lambda: pb.SegmentRequest(
                image=pb.ImageInput(data=png_bytes(phantom(1).image)), boxes=[pb.Box(x0=10, y0=10, x1=99999, y1=50)]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside",
        ),
        (
            lambda: pb.ClassifyRequest(
                image=pb.ImageInput(array=pb.NDArray(data=b"\0" * 7, shape=[4, 4], dtype="uint8"))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 16 bytes",
        ),
    ],
)
async def test_bad_requests_get_the_right_code(
    channel: grpc.aio.Channel, request_factory: object, code: grpc.StatusCode, fragment: str
) -> None:
    request = request_factory()  # type: ignore[operator]
    method = {pb.ClassifyRequest: "Classify", pb.SegmentRequest: "Segment"}[type(request)]
    call = channel.unary_unary(
        f"/medgate.v1.Inference/{method}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=pb.ClassifyResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call(request)
    assert failure.value.code() == code
    assert fragment in (failure.value.details() or "")
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_every_method_resolves_through_reflection_as_ghz_asks(channel: grpc.aio.Channel) -> None:
    """ghz asks FileContainingSymbol('medgate.v1.Inference.Classify'); stock Python reflection says NOT_FOUND."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    service = pb.DESCRIPTOR.services_by_name["Inference"]
    symbols = [service.full_name] + [f"{service.full_name}.{m.name}" for m in service.methods]
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
    requests.append(reflection_pb2.ServerReflectionRequest(list_services=""))

    async def send() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for request in requests:
            yield request

    answers = [answer async for answer in stub.ServerReflectionInfo(send())]
    assert len(answers) == len(requests)
    for symbol, answer in zip(symbols, answers[:-1], strict=True):
        assert answer.HasField("file_descriptor_response"), symbol
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        assert "medgate/v1/inference.proto" in [f.name for f in files], symbol
    listed = {s.name for s in answers[-1].list_services_response.service}
    assert {"medgate.v1.Inference", "grpc.health.v1.Health"} <= listed
    unknown = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="medgate.v1.Inference.Nope")]

    async def send_unknown() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for request in unknown:
            yield request

    missing = [answer async for answer in stub.ServerReflectionInfo(send_unknown())]
    assert missing[0].HasField("error_response")


def _requests_total(gateway: GatewayServer, clients: Clients, rpc: str, code: str) -> float:
    """The server's own count of finished calls (``medgate_requests_total``) from its /metrics page."""
    text = clients.metrics(gateway.metrics_port)
    wanted = f'medgate_requests_total{{code="{code}",rpc="{rpc}"}} '
    return sum(float(line[len(wanted) :]) for line in text.splitlines() if line.startswith(wanted))


async def test_deadline_is_honoured(
    stub: pb_grpc.InferenceStub, gateway: GatewayServer, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its deadline a call stops on the server too: its access-log line and the request count end it at about
    the deadline, where a server that ignored the deadline would finish the work and log OK. (The caller's
    DEADLINE_EXCEEDED alone proves nothing: the client raises it by itself.)"""
    caplog.set_level(logging.INFO)  # the access log's logger name is not part of the contract; its fields are
    data = pydicom_data_file("RG1_UNCI.dcm").read_bytes()  # 1955x1841: decode, three prompts, LiteMedSAM
    request = pb.SegmentRequest(image=pb.ImageInput(data=data), prompts="heart & left lung & right lung")
    full_s = 120.0
    for _ in range(2):  # warm, and the time the whole work takes here (the faster of two, so noise cannot inflate it)
        started = time.perf_counter()
        await stub.Segment(request, timeout=120)
        full_s = min(full_s, time.perf_counter() - started)
    # The caller's own cancellation at its deadline can reach the server a moment before the server's copy of
    # the deadline passes (it was set when the headers arrived); the access log counts that as DEADLINE_EXCEEDED,
    # what the caller saw. CANCELLED would be a caller that gave up early; OK one that ran to the end.
    before = _requests_total(gateway, clients, "Segment", "DEADLINE_EXCEEDED")

    # A third of the work: long enough for the request to reach the handler, well short of the answer.
    deadline_s = full_s / 3
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Segment(request, timeout=deadline_s, metadata=(("x-request-id", "deadline-check"),))
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    records: list[logging.LogRecord] = []
    for _ in range(100):  # the server writes its line when its handler ends, which may be after the client gave up
        records = [r for r in caplog.records if getattr(r, "request_id", None) == "deadline-check"]
        if records:
            break
        await asyncio.sleep(0.05)
    (record,) = records
    assert record.__dict__["code"] == "DEADLINE_EXCEEDED", record.getMessage()
    assert "DEADLINE_EXCEEDED" in record.getMessage()
    # It stopped at the deadline, not when the work would have been done.
    assert record.__dict__["duration_ms"] < (deadline_s + full_s / 3) * 1000.0, (deadline_s, full_s)
    assert _requests_total(gateway, clients, "Segment", "DEADLINE_EXCEEDED") == before + 1

    answered = time.perf_counter()  # and the server is free: the next call takes the usual time
    await stub.Segment(request, timeout=120)
    assert time.perf_counter() - answered < 2 * full_s + 1.0


async def _loop_soon(review_server: ReviewServer, name: str, timeout_s: float = 15.0) -> Any:
    """The human loop once the gateway's background delivery has reached the review service."""
    import asyncio

    from services.review.store import NotFound

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return review_server.store.describe(name)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_unsure_detection_is_routed_to_review_and_a_sure_one_is_not(
    stub: pb_grpc.InferenceStub, review_server: ReviewServer
) -> None:
    """Seed 003's rule (config/flows.toml): a human loop when the top detection score is under 0.5."""
    normal = phantom(31, lesion_probability=0.0)
    unsure = await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=png_bytes(normal.image))))
    assert max((d.score for d in unsure.detections), default=0.0) < 0.5
    assert [r.flow_definition for r in unsure.review] == ["lesion-detection"]
    # The answer leaves once the case is safe in the outbox (queued); the send follows it.
    assert (unsure.review[0].queued or unsure.review[0].routed) and unsure.review[0].human_loop_name
    loop = await _loop_soon(review_server, unsure.review[0].human_loop_name)
    assert loop.status == "InProgress" and loop.input_content["detection"]["model"]["name"] == "detector"
    assert review_server.store.images(loop.name)["image.png"][:4] == b"\x89PNG"

    again = await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=png_bytes(normal.image))))
    assert again.review[0].human_loop_name == loop.name  # the same image never opens a second loop

    sick = phantom(5, lesion_probability=1.0)
    sure = await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=png_bytes(sick.image))))
    assert sure.detections[0].score >= 0.5
    assert not [r for r in sure.review if r.flow_definition == "lesion-detection"]


async def test_routed_case_reaches_a_reviewer_and_lands_as_a2i_output(
    stub: pb_grpc.InferenceStub, review_server: ReviewServer, clients: Clients
) -> None:
    import asyncio
    import subprocess
    import sys
    from pathlib import Path

    normal = phantom(37, lesion_probability=0.0)
    answer = await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=png_bytes(normal.image))))
    name = answer.review[0].human_loop_name
    await _loop_soon(review_server, name)  # delivered after the answer left
    # Earlier tests may have queued other loops and reviewers take the oldest first: answer them all.
    waiting, _ = review_server.store.list(flow="lesion-detection", status="InProgress")
    # With tokens the reviewer is the reviewer token's subject; without, the id the client names.
    reviewer = "dr-dev" if clients.secure else "dr-test"
    command = [
        sys.executable,
        "-m",
        "clients.cli",
        "reviewer",
        *([] if clients.secure else ["--reviewer-id", reviewer]),
        *clients.flags(Role.REVIEWER),
        "--flow",
        "lesion-detection",
        "--auto",
        "accept",
        "--limit",
        str(len(waiting)),
        "--target",
        f"127.0.0.1:{review_server.port}",
    ]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert f"case {name}" in out.decode()
    loop = review_server.store.describe(name)
    assert loop.status == "Completed"
    for _ in range(50):
        loop = review_server.store.describe(name)
        if loop.output_path:
            break
        await asyncio.sleep(0.1)
    document = json.loads(Path(loop.output_path).read_text())
    assert document["humanLoopName"] == name
    assert document["humanAnswers"][0]["workerId"] == reviewer
    assert "boundingBoxes" in document["humanAnswers"][0]["answerContent"]["annotatedResult"]


async def test_metrics_endpoint_has_stage_histograms_and_status_codes(
    stub: pb_grpc.InferenceStub, gateway: GatewayServer, clients: Clients
) -> None:
    await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=png_bytes(phantom(2).image))))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=b"garbage")))
    text = clients.metrics(gateway.metrics_port)

    def value(prefix: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert lines, prefix
        return float(lines[0].rsplit(" ", 1)[1])

    for stage in ("decode", "preprocess", "triton", "encode", "total"):
        labels = f'input_kind="png",model="classifier",rpc="Classify",stage="{stage}"'
        assert value(f"medgate_stage_seconds_count{{{labels}}}") >= 1
    assert value('medgate_requests_total{code="OK",rpc="Classify"}') >= 1
    assert value('medgate_requests_total{code="INVALID_ARGUMENT",rpc="Classify"}') >= 1
    assert value('medgate_triton_request_seconds_count{model="classifier"}') >= 1
    assert "Doe^Jane" not in text and "PID-93412" not in text
