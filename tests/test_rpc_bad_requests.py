"""Bad requests against the real gateway: INVALID_ARGUMENT naming the field, never INTERNAL or UNKNOWN.

Each is what a new user (or a fuzzing PACS router) sends: an enum number from a newer client, a NaN
threshold, a prompt in a legacy encoding. The gateway must answer at once, name what is wrong
without quoting the caller's text, and keep serving.
"""

from __future__ import annotations

import logging
import math

import grpc
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fixtures import phantom, png_bytes

IMAGE = pb.ImageInput(data=png_bytes(phantom(7).image))


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value


async def test_unknown_input_kind_names_the_field(stub: pb_grpc.InferenceStub) -> None:
    error = await _refused(stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=IMAGE.data, kind=99))))  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image.kind" in (error.details() or "") and "99" in (error.details() or "")


async def test_unknown_task_is_refused_not_answered_empty(stub: pb_grpc.InferenceStub) -> None:
    request = pb.AnalyzeRequest(image=IMAGE, tasks=[pb.TASK_CLASSIFY, 99])  # type: ignore[list-item]
    error = await _refused(stub.Analyze(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tasks[1]" in (error.details() or "")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_min_score_is_refused(stub: pb_grpc.InferenceStub, value: float) -> None:
    error = await _refused(stub.Detect(pb.DetectRequest(image=IMAGE, min_score=value)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_score" in (error.details() or "")


async def test_out_of_range_detection_limits_are_refused(stub: pb_grpc.InferenceStub) -> None:
    for request, field in (
        (pb.DetectRequest(image=IMAGE, min_score=1.5), "min_score"),
        (pb.DetectRequest(image=IMAGE, max_detections=-1), "max_detections"),
        (pb.AnalyzeRequest(image=IMAGE, tasks=[pb.TASK_DETECT], min_score=-0.1), "min_score"),
    ):
        call = stub.Analyze(request) if isinstance(request, pb.AnalyzeRequest) else stub.Detect(request)
        error = await _refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (error.details() or ""), field


async def test_unknown_mask_space_is_refused(stub: pb_grpc.InferenceStub) -> None:
    request = pb.SegmentRequest(image=IMAGE, prompts="heart", output=pb.OutputOptions(mask_space=7))  # type: ignore[arg-type]
    error = await _refused(stub.Segment(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output.mask_space" in (error.details() or "")


def _with_latin1_prompt(request: pb.SegmentRequest, placeholder: str, raw: bytes) -> bytes:
    """The request's bytes with one prompt's UTF-8 swapped for ``raw`` (as a Latin-1 client would send it)."""
    data = request.SerializeToString()
    assert data.count(placeholder.encode()) == 1 and len(raw) == len(placeholder.encode())
    return data.replace(placeholder.encode(), raw)


async def test_a_prompt_that_is_not_utf8_names_the_field(
    channel: grpc.aio.Channel, stub: pb_grpc.InferenceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = pb.SegmentRequest(image=IMAGE, prompts="heart & M\u00fcller")
    raw = _with_latin1_prompt(request, "M\u00fcller", b"M\xfcller\x00")
    segment = channel.unary_unary(
        "/medgate.v1.Inference/Segment",
        request_serializer=lambda body: body,
        response_deserializer=pb.SegmentResponse.FromString,
    )
    error = await _refused(segment(raw))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts" in (error.details() or "") and "UTF-8" in (error.details() or "")
    assert "ller" not in (error.details() or "") and "M\xfcller" not in caplog.text
    # The same call in UTF-8 still works: nothing about the server changed.
    assert (await stub.Segment(pb.SegmentRequest(image=IMAGE, prompts="heart"))).prompts[0].category


async def test_an_undecodable_stream_item_fails_that_item_only(channel: grpc.aio.Channel) -> None:
    good = pb.AnalyzeRequest(image=IMAGE, tasks=[pb.TASK_CLASSIFY], request_id="good")
    bad = pb.AnalyzeRequest(image=IMAGE, tasks=[pb.TASK_SEGMENT], prompts="Zo\u00eb", request_id="bad")
    raw_bad = bad.SerializeToString().replace("Zo\u00eb".encode(), b"Zo\xeb\x00")
    analyze_stream = channel.stream_stream(
        "/medgate.v1.Inference/AnalyzeStream",
        request_serializer=lambda body: body,
        response_deserializer=pb.AnalyzeStreamResponse.FromString,
    )
    call = analyze_stream(iter([good.SerializeToString(), raw_bad, good.SerializeToString()]))
    answers = [answer async for answer in call]
    assert len(answers) == 3
    errors = [a.error for a in answers if a.HasField("error")]
    assert len(errors) == 1 and errors[0].code_name == "INVALID_ARGUMENT" and "prompts" in errors[0].message
    assert sum(1 for a in answers if a.HasField("response") and a.request_id == "good") == 2
    assert await call.code() == grpc.StatusCode.OK


async def test_an_unknown_prompt_is_refused_without_echoing_it(
    stub: pb_grpc.InferenceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    error = await _refused(stub.Segment(pb.SegmentRequest(image=IMAGE, prompts="heart & Jane Doe mole")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "prompt 2" in details or "prompts[0][1]" in details, details
    # The model lower-cases prompts before it looks them up: neither spelling may come back or be logged.
    assert "jane" not in details.lower() and "jane doe" not in caplog.text.lower()
