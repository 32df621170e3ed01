"""Request ids and access logs: every call is logged once with its id, code and timings, and no patient data."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.logs import JsonFormatter
from tests.fixtures import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME, dicom_bytes, phantom


def _rpc_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "rpc" and r.__dict__["request_id"] == request_id]


async def _logged(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    """The call's access-log records; the server writes its line when the handler ends, which may be after the
    client has the failed status (seen over TLS)."""
    for _ in range(100):
        records = _rpc_records(caplog, request_id)
        if records:
            return records
        await asyncio.sleep(0.02)
    return []


async def test_a_callers_request_id_comes_back_and_is_logged_with_timings(
    stub: pb_grpc.InferenceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medgate.gateway")
    data = dicom_bytes(phantom(3).image)
    call = stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=data)), metadata=(("x-request-id", "pacs-42.a"),))
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "pacs-42.a"
    (record,) = _rpc_records(caplog, "pacs-42.a")
    assert record.__dict__["rpc"] == "Classify" and record.__dict__["code"] == "OK"
    assert record.__dict__["duration_ms"] > 0 and record.__dict__["triton_ms"] > 0 and record.__dict__["decode_ms"] > 0
    line = json.loads(JsonFormatter().format(record))  # what a log pipeline receives
    assert line["request_id"] == "pacs-42.a" and line["code"] == "OK" and line["logger"] == "medgate.gateway"
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text and PATIENT_BIRTH_DATE not in caplog.text


async def test_a_failed_call_is_logged_with_its_code_and_a_generated_id(
    stub: pb_grpc.InferenceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medgate.gateway")
    data = dicom_bytes(phantom(4).image)
    request = pb.SegmentRequest(image=pb.ImageInput(data=data), prompts="left lung & spleen")
    # A free-text id (it could carry anything) is not trusted: the gateway makes its own.
    call = stub.Segment(request, metadata=(("x-request-id", "Jane Doe 1970"),))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request_id = dict(refused.value.trailing_metadata() or ())["x-request-id"]
    assert request_id != "Jane Doe 1970" and len(request_id) == 16
    (record,) = await _logged(caplog, request_id)
    assert record.__dict__["code"] == "INVALID_ARGUMENT" and record.__dict__["error"]
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text and "Jane Doe" not in caplog.text
