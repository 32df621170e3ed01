"""Every file a PACS could send, and the malformed ones, through the real gateway: right shapes or the exact code."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.imaging.errors import InvalidImage, LimitExceeded, UnsupportedCodec
from services.security.identity import Role
from tests.conftest import Clients
from tests.test_ingest import CORPUS, _deflate_zeros, _dicom_bytes, _expected, _key, _png, _small_image

CODE_OF = {
    InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedCodec: grpc.StatusCode.FAILED_PRECONDITION,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


async def _still_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="medgate.v1.Inference"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_corpus_file_through_classify(stub: pb_grpc.InferenceStub, channel: grpc.aio.Channel) -> None:
    """pydicom's and pydicom-data's files: each one OK with the right transform, or its exact code."""
    decoded = failed = 0
    for path in CORPUS:
        key = _key(path)
        expected = _expected(key)
        request = pb.ClassifyRequest(image=pb.ImageInput(data=path.read_bytes()))
        if expected is None:
            response = await stub.Classify(request, timeout=120)
            t = response.transform
            assert (t.original_width, t.original_height) == (response.image.width, response.image.height), key
            assert t.model_size == 1024 and max(t.resized_width, t.resized_height) == 1024, key
            assert len(response.scores) >= 2 and response.image.kind == pb.INPUT_KIND_DICOM, key
            decoded += 1
        else:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.Classify(request, timeout=120)
            assert failure.value.code() == CODE_OF[expected[0]], key
            assert failure.value.details(), key
            failed += 1
    assert decoded >= 150 and failed >= 50
    await _still_serving(channel)


def _deflate_bomb() -> bytes:
    header = _dicom_bytes(_small_image(), DeflatedExplicitVRLittleEndian)
    meta_end = 132 + 12 + struct.unpack_from("<I", header, 140)[0]
    return header[:meta_end] + _deflate_zeros(1 << 30)


def _png_bomb() -> bytes:
    rows = zlib.compressobj(9)
    return _png(30000, 30000, idat=rows.compress(b"\x00" * (30001 * 64)) + rows.flush())


MALFORMED = [
    ("empty", lambda: b"", grpc.StatusCode.INVALID_ARGUMENT),
    ("garbage", lambda: bytes(range(256)) * 16, grpc.StatusCode.INVALID_ARGUMENT),
    ("deflate-bomb", _deflate_bomb, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("png-bomb-30000", _png_bomb, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("png-65535", lambda: _png(65535, 65535, idat=zlib.compress(b"\x00" * 100)), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("dicom-65535", lambda: _dicom_bytes(_small_image(Rows=65535, Columns=65535)), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("truncated-dicom", lambda: _dicom_bytes(_small_image(64, 64))[:-1000], grpc.StatusCode.INVALID_ARGUMENT),
    ("tiff", lambda: b"II*\x00" + b"\x00" * 40, grpc.StatusCode.FAILED_PRECONDITION),
]


@pytest.mark.parametrize(("name", "make", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_input_gets_its_code_and_the_server_keeps_serving(
    stub: pb_grpc.InferenceStub, channel: grpc.aio.Channel, name: str, make: object, code: grpc.StatusCode
) -> None:
    data = make()  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=data)), timeout=60)
    assert failure.value.code() == code, (name, failure.value.details())
    assert failure.value.code() != grpc.StatusCode.UNKNOWN
    await _still_serving(channel)


async def test_error_messages_carry_no_patient_data(stub: pb_grpc.InferenceStub) -> None:
    from tests.fixtures import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME, dicom_bytes, phantom

    broken = dicom_bytes(phantom(3).image)[:-5000]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Classify(pb.ClassifyRequest(image=pb.ImageInput(data=broken)))
    details = failure.value.details() or ""
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, "Doe"):
        assert secret not in details


async def test_a_role_without_a_model_answers_unimplemented(
    triton_url: str, shared_security: dict[str, Any], clients: Clients, tmp_path: Path
) -> None:
    """A deployment with no box segmenter (settings.models.segmenter_box = ""): the other roles serve."""
    import cv2
    import numpy as np

    from services.gateway.server import GatewayServer
    from services.settings import load_settings

    settings = load_settings(
        gateway={"port": 0, "metrics_port": -1},
        review={"enabled": False},
        models={"segmenter_box": ""},
        security={**shared_security, "audit_dir": tmp_path / "audit"},  # its own trail beside the shared gateway's
    )
    server = GatewayServer(settings, triton_url)
    await server.start(port=0)
    try:
        async with clients.channel(f"127.0.0.1:{server.port}", Role.INFERENCE) as channel:
            stub = pb_grpc.InferenceStub(channel)
            pixels = np.random.default_rng(5).integers(0, 255, (256, 256), dtype=np.uint8)
            image = pb.ImageInput(data=cv2.imencode(".png", pixels)[1].tobytes())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Segment(pb.SegmentRequest(image=image, boxes=[pb.Box(x0=10, y0=10, x1=90, y1=90)]))
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "segmenter_box" in (refused.value.details() or "")
            answer = await stub.Segment(pb.SegmentRequest(image=image, prompts="heart"))
            assert [p.prompt for p in answer.prompts] == ["heart"]
            assert (await stub.Classify(pb.ClassifyRequest(image=image))).scores
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                await health.Check(health_pb2.HealthCheckRequest(service="medgate.v1.Inference"))
            ).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="medgate.v1.Inference/segmenter_box"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop()
