"""The request checks of the RPC layer, without a server: field paths, enums, non-finite numbers, UTF-8."""

from __future__ import annotations

import math

import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import review_pb2 as rpb
from services.rpc.errors import BadRequest
from services.rpc.validation import Undecodable, check_message, decode_or_explain, invalid_utf8_field


def test_valid_requests_pass() -> None:
    check_message(pb.AnalyzeRequest(tasks=[pb.TASK_CLASSIFY], min_score=0.5, boxes=[pb.Box(x0=1, y0=2, x1=3, y1=4)]))
    check_message(rpb.ListHumanLoopsRequest(status=rpb.HUMAN_LOOP_STATUS_COMPLETED))


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (pb.ClassifyRequest(image=pb.ImageInput(kind=42)), "image.kind"),  # type: ignore[arg-type]
        (pb.AnalyzeRequest(tasks=[pb.TASK_DETECT, pb.TASK_SEGMENT, 9]), "tasks[2]"),  # type: ignore[list-item]
        (pb.AnalyzeRequest(boxes=[pb.Box(), pb.Box(x1=math.nan)]), "boxes[1].x1"),
        (pb.ClassifyRequest(image=pb.ImageInput(window=pb.Window(center=math.inf, width=1))), "image.window.center"),
        (pb.SegmentRequest(output=pb.OutputOptions(mask_encoding=3)), "output.mask_encoding"),  # type: ignore[arg-type]
    ],
)
def test_the_first_bad_field_is_named_by_its_path(message: object, path: str) -> None:
    with pytest.raises(BadRequest) as refused:
        check_message(message)  # type: ignore[arg-type]
    assert str(refused.value).startswith(path + ":") or str(refused.value).startswith(path + " "), str(refused.value)


def test_a_string_that_is_not_utf8_is_found_in_a_nested_message() -> None:
    request = pb.AnalyzeStreamResponse(response=pb.AnalyzeResponse(request_id="ABCD"), request_id="ok")
    raw = request.SerializeToString().replace(b"ABCD", b"AB\xc3\x28")
    assert invalid_utf8_field(pb.AnalyzeStreamResponse.DESCRIPTOR, raw) == "response.request_id"
    parsed = decode_or_explain(pb.AnalyzeStreamResponse.DESCRIPTOR, raw, pb.AnalyzeStreamResponse.FromString)
    assert isinstance(parsed, Undecodable)
    assert "response.request_id is not valid UTF-8" in str(parsed.error()) and "AB" not in str(parsed.error())


def test_garbage_is_undecodable_without_a_field() -> None:
    parsed = decode_or_explain(pb.ClassifyRequest.DESCRIPTOR, b"\x0a\xff\xff\xff", pb.ClassifyRequest.FromString)
    assert isinstance(parsed, Undecodable) and "not a protobuf message" in parsed.problem


def test_good_bytes_parse_as_usual() -> None:
    data = pb.SegmentRequest(prompts="left lung").SerializeToString()
    parsed = decode_or_explain(pb.SegmentRequest.DESCRIPTOR, data, pb.SegmentRequest.FromString)
    assert isinstance(parsed, pb.SegmentRequest) and parsed.prompts == "left lung"
