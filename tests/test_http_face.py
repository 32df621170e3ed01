"""The HTTP/JSON face against the real gateway, Triton and models, through a plain HTTP client (http.client).

MedImageParse's ``POST /score`` with seed 002's own request and with a real radiograph (PNG and DICOM),
decoded as seed 002 decodes it and compared with the gRPC answer's masks; the ``/v1`` routes against
their gRPC calls; each refusal's exact status and JSON error; the shared gateway's TLS and tokens (a
token matrix over every route) and its audit trail for HTTP callers. The pure modules (request
schema, JSON mapping, proto comments) and the listener's TLS (reload, mutual TLS, plaintext only on
loopback) are tested without Triton.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.client
import json
import logging
import shutil
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import numpy as np
import pydicom
import pytest
from google.protobuf import json_format

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.http import openapi, protojson, score
from services.http.server import HttpServer
from services.rpc.errors import BadRequest, RequestTooLarge
from services.security.credentials import (
    SUBJECTS,
    DevCredentials,
    ensure_dev_credentials,
    load_signing_key,
    mint_token,
    new_signing_key,
)
from services.security.identity import Role
from services.settings import load_settings
from tests.conftest import SECURE_FIXTURES, security_values
from tests.fixtures import PATIENT_NAME, dicom_bytes, phantom, png_bytes, pydicom_data_file

# Seed 002's example request, exactly: its 2x2 PNG (base64 with line breaks, as base64.encodebytes writes it)
# and its prompts, which our phantom-trained text segmenter does not know.
SEED_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAYAAABytg0kAAAAAXNSR0IArs4c6QAAAARnQU1BAACx\n"
    "jwv8YQUAAAAJcEhZcwAAFiUAABYlAUlSJPAAAAAbSURBVBhXY/gUoPS/fhfDfwaGJe///9/J8B8A\n"
    "VGwJ5VDvPeYAAAAASUVORK5CYII=\n"
)
SEED_PROMPTS = "neoplastic & inflammatory cells "
SEED_REQUEST = {
    "input_data": {
        "columns": ["image", "text"],
        "index": [0],
        "data": [[SEED_PNG_BASE64, SEED_PROMPTS]],
    }
}
KNOWN_PROMPTS = "left lung & right lung & heart"


def seed_decode(answer_item: dict[str, Any]) -> np.ndarray:
    """Seed 002's decoding, step by step: json.loads, base64, np.frombuffer, reshape."""
    features = json.loads(answer_item["image_features"])
    data = base64.b64decode(features["data"])
    return np.frombuffer(data, dtype=np.dtype(features["dtype"])).reshape(features["shape"])


def grpc_masks(response: pb.SegmentResponse) -> np.ndarray:
    features = response.image_features
    return np.frombuffer(features.data, dtype=features.dtype).reshape(list(features.shape))


def score_body(*items: tuple[bytes, str], columns: tuple[str, str] = ("image", "text")) -> dict[str, Any]:
    rows = []
    for image, prompts in items:
        encoded = base64.encodebytes(image).decode("utf-8")
        rows.append([encoded, prompts] if columns == ("image", "text") else [prompts, encoded])
    return {"input_data": {"columns": list(columns), "index": list(range(len(rows))), "data": rows}}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes = field(repr=False)

    @property
    def error(self) -> dict[str, Any]:
        return dict(self.body["error"])


@dataclass
class Http:
    """A plain HTTP(S) client of one listener (http.client, one connection per request, in a thread)."""

    port: int
    ca_file: Path | None
    token: str | None = field(default=None, repr=False)
    host: str = "localhost"

    def _connection(self) -> http.client.HTTPConnection:
        if self.ca_file is None:
            return http.client.HTTPConnection(self.host, self.port, timeout=300)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return http.client.HTTPSConnection(self.host, self.port, timeout=300, context=context)

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        connection = self._connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()
        parsed = (
            json.loads(raw) if raw and answer_headers.get("content-type", "").startswith("application/json") else None
        )
        return Answer(response.status, answer_headers, parsed, raw)

    async def post(
        self,
        path: str,
        body: Any,
        *,
        token: str | bool | None = True,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """POST ``body`` (JSON-encoded unless bytes); ``token`` True: this client's token, None/False: none."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        bearer = self.token if token is True else token
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        return await asyncio.to_thread(self._request, "POST", path, data, sent)

    async def get(self, path: str) -> Answer:
        return await asyncio.to_thread(self._request, "GET", path, None, {})


def assert_error(answer: Answer, status: int, code: str, *fragments: str) -> None:
    assert answer.status == status, (answer.status, answer.raw[:500])
    error = answer.error
    assert error["code"] == status and error["status"] == code
    assert error["request_id"] and answer.headers["x-request-id"] == error["request_id"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    assert "Traceback" not in answer.raw.decode()


@pytest.fixture(scope="module")
def http_client(gateway: GatewayServer, dev_credentials: DevCredentials) -> Http:
    """The shared gateway's HTTP face as `make run` serves it: TLS and the inference token (or plain)."""
    if not SECURE_FIXTURES:
        return Http(gateway.http_port, None)
    return Http(gateway.http_port, dev_credentials.ca_cert, dev_credentials.token(Role.INFERENCE))


@pytest.fixture(scope="module")
def radiograph() -> tuple[bytes, bytes]:
    """A real radiograph (pydicom-data's RG1_UNCI.dcm, 1841x1955, 16-bit): its DICOM file and an 8-bit PNG of it."""
    path = pydicom_data_file("RG1_UNCI.dcm")
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    low, high = np.percentile(pixels, [0.5, 99.5])
    eight_bit = np.clip((pixels - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    return path.read_bytes(), png_bytes(eight_bit)


# POST /score: MedImageParse's contract.


async def test_seed_002_request_exactly_is_refused_for_its_unknown_prompts(http_client: Http) -> None:
    answer = await http_client.post("/score", SEED_REQUEST)
    # The phantom-trained segmenter knows chest anatomy and lesions, not cells: INVALID_ARGUMENT, the prompt unquoted.
    assert_error(answer, 400, "INVALID_ARGUMENT", "input_data.data[0]: ", "unknown prompt")
    assert "neoplastic" not in answer.raw.decode() and "inflammatory" not in answer.raw.decode()


async def test_seed_002_png_with_known_prompts_decodes_as_seed_002_says(
    http_client: Http, stub: pb_grpc.InferenceStub
) -> None:
    body = json.loads(json.dumps(SEED_REQUEST))
    body["input_data"]["data"][0][1] = KNOWN_PROMPTS
    answer = await http_client.post("/score", body, headers={"X-Request-Id": "seed-002-known"})
    assert answer.status == 200, answer.raw[:500]
    assert answer.headers["x-request-id"] == "seed-002-known"
    (item,) = answer.body
    assert isinstance(item["image_features"], str)  # a JSON string, as MedImageParse answers
    masks = seed_decode(item)
    assert masks.shape == (3, 1024, 1024) and masks.dtype == np.uint8
    assert item["text_features"] == ["lung", "lung", "heart anatomies"]
    image = base64.b64decode(SEED_PNG_BASE64)
    expected = await stub.Segment(pb.SegmentRequest(image=pb.ImageInput(data=image), prompts=KNOWN_PROMPTS))
    assert np.array_equal(masks, grpc_masks(expected))
    # medgate's extras, in keys an old client ignores.
    assert item["transform"]["original_width"] == 2 and item["transform"]["model_size"] == 1024
    assert len(item["scores"]) == 3 and all(0.0 <= s <= 1.0 for s in item["scores"])
    assert [p["category"] for p in item["prompts"]] == item["text_features"]
    assert {m["name"] for m in item["models"]} == {m.name for m in expected.models}
    assert item["image"]["kind"] == "INPUT_KIND_PNG" and item["image"]["width"] == 2


async def test_a_real_radiograph_as_png_and_as_dicom_in_one_request(
    http_client: Http, stub: pb_grpc.InferenceStub, radiograph: tuple[bytes, bytes]
) -> None:
    dicom, png = radiograph
    # Columns in the other order: each item is then [text, image], as MedImageParse's columns say.
    body = score_body((png, KNOWN_PROMPTS), (dicom, "heart & lungs"), columns=("text", "image"))
    answer = await http_client.post("/score", body)
    assert answer.status == 200, answer.raw[:500]
    first, second = answer.body
    for item, data, prompts in ((first, png, KNOWN_PROMPTS), (second, dicom, "heart & lungs")):
        expected = await stub.Segment(pb.SegmentRequest(image=pb.ImageInput(data=data), prompts=prompts))
        masks = seed_decode(item)
        assert np.array_equal(masks, grpc_masks(expected))
        assert item["text_features"] == list(expected.text_features)
        assert item["transform"] == protojson.to_dict(expected.transform)
        assert masks.reshape(masks.shape[0], -1).sum(axis=1).min() > 10_000  # real organs, not empty masks
    assert first["transform"]["original_width"] == 1841 and first["transform"]["original_height"] == 1955
    assert second["image"]["kind"] == "INPUT_KIND_DICOM"
    assert second["image"]["sop_instance_uid"] == pydicom.dcmread(pydicom_data_file("RG1_UNCI.dcm")).SOPInstanceUID


async def test_score_refusals_have_their_exact_statuses(http_client: Http) -> None:
    png = base64.encodebytes(png_bytes(phantom(1).image[::8, ::8])).decode()
    good = {"input_data": {"columns": ["image", "text"], "index": [0], "data": [[png, "heart"]]}}

    def changed(**input_data: Any) -> dict[str, Any]:
        return {"input_data": {**good["input_data"], **input_data}}

    malformed = await http_client.post("/score", b'{"input_data": {"columns": ["image", "text"], ')
    assert_error(malformed, 400, "INVALID_ARGUMENT", "not valid JSON", "line 1")
    assert_error(await http_client.post("/score", b""), 400, "INVALID_ARGUMENT", "empty")
    assert_error(await http_client.post("/score", [1, 2]), 400, "INVALID_ARGUMENT", "input_data")
    columns = await http_client.post("/score", changed(columns=["image", "prompt"]))
    assert_error(columns, 400, "INVALID_ARGUMENT", "input_data.columns")
    assert_error(await http_client.post("/score", changed(columns=["image"])), 400, "INVALID_ARGUMENT", "columns")
    assert_error(await http_client.post("/score", changed(index=[0, 1])), 400, "INVALID_ARGUMENT", "input_data.index")
    items = await http_client.post("/score", changed(data=[[png, "heart"]] * 257, index=list(range(257))))
    assert_error(items, 413, "RESOURCE_EXHAUSTED", "257 items", "256")
    not_base64 = await http_client.post("/score", changed(data=[["not base64 at all!", "heart"]]))
    assert_error(not_base64, 400, "INVALID_ARGUMENT", "input_data.data[0][0] is not valid base64")
    not_image = await http_client.post("/score", changed(data=[[base64.b64encode(b"hello").decode(), "heart"]]))
    assert_error(not_image, 400, "INVALID_ARGUMENT", "input_data.data[0]: ")
    row = await http_client.post("/score", changed(data=[[png]]))
    assert_error(row, 400, "INVALID_ARGUMENT", "input_data.data[0] must be a list of two strings")
    # An unknown prompt in the second item: the item is named, the prompt (a patient's name here) is not quoted.
    unknown = await http_client.post("/score", changed(data=[[png, "heart"], [png, PATIENT_NAME]], index=[0, 1]))
    assert_error(unknown, 400, "INVALID_ARGUMENT", "input_data.data[1]: ", "unknown prompt")
    assert PATIENT_NAME not in unknown.raw.decode()
    many = await http_client.post("/score", changed(data=[[png, "heart & " * 20 + "heart"]]))
    assert_error(many, 413, "RESOURCE_EXHAUSTED", "input_data.data[0]: ", "21 prompts")


async def test_limits_deadlines_and_routes(http_client: Http, radiograph: tuple[bytes, bytes]) -> None:
    declared = await asyncio.to_thread(_declared_length_only, http_client, 10**9)
    assert_error(declared, 413, "RESOURCE_EXHAUSTED", "1000000000 bytes", "gateway.http_max_body_bytes")
    dicom, _ = radiograph
    body = score_body((dicom, KNOWN_PROMPTS))
    late = await http_client.post("/score", body, headers={"X-Deadline-Ms": "5", "X-Request-Id": "late-one"})
    assert_error(late, 504, "DEADLINE_EXCEEDED")
    assert late.headers["x-request-id"] == "late-one"
    bad = await http_client.post("/score", body, headers={"X-Deadline-Ms": "soon"})
    assert_error(bad, 400, "INVALID_ARGUMENT", "X-Deadline-Ms")
    missing = await http_client.post("/v2/segment", {})
    assert missing.status == 404 and missing.error["status"] == "NOT_FOUND"
    wrong_method = await http_client.get("/score")
    assert wrong_method.status == 405 and wrong_method.error["status"] == "UNIMPLEMENTED"
    # A free-text request id is replaced (it could carry a name), as the gRPC interceptor does.
    renamed = await http_client.post("/score", [], headers={"X-Request-Id": "Doe Jane"})
    assert renamed.headers["x-request-id"] != "Doe Jane" and "Doe" not in renamed.raw.decode()


def _declared_length_only(client: Http, length: int) -> Answer:
    """Headers that announce ``length`` bytes, and no body: the answer must come before any of it is read."""
    connection = client._connection()
    try:
        connection.putrequest("POST", "/score")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        if client.token:
            connection.putheader("Authorization", f"Bearer {client.token}")
        connection.endheaders()
        response = connection.getresponse()
        raw = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw), raw)
    finally:
        connection.close()


# POST /v1/*: the gRPC messages in protobuf's JSON mapping.


async def test_v1_routes_answer_as_the_grpc_calls_do(http_client: Http, stub: pb_grpc.InferenceStub) -> None:
    data = dicom_bytes(phantom(5, lesion_probability=1.0).image)
    image = {"data": base64.b64encode(data).decode()}
    calls: list[tuple[str, dict[str, Any], Any, type[Any]]] = [
        ("classify", {"image": image}, stub.Classify, pb.ClassifyRequest),
        ("detect", {"image": image, "minScore": 0.1}, stub.Detect, pb.DetectRequest),
        (
            "segment",
            {
                "image": image,
                "prompts": "left lung & lesion",
                "boxes": [{"x0": 100, "y0": 150, "x1": 400, "y1": 500}],
                "output": {"mask_space": "MASK_SPACE_BOTH", "mask_encoding": "ARRAY_ENCODING_PACKBITS"},
            },
            stub.Segment,
            pb.SegmentRequest,
        ),
        (
            "analyze",
            {"image": image, "tasks": ["TASK_CLASSIFY", 2], "request_id": "mine"},
            stub.Analyze,
            pb.AnalyzeRequest,
        ),
    ]
    document = openapi.document()
    for route, body, rpc, request_type in calls:
        answer = await http_client.post(f"/v1/{route}", body)
        assert answer.status == 200, (route, answer.raw[:500])
        assert answer.headers["content-type"] == "application/json"
        response_type = getattr(pb, request_type.__name__.replace("Request", "Response"))
        over_http = json_format.ParseDict(answer.body, response_type())
        over_grpc = await rpc(json_format.ParseDict(body, request_type()))
        for message in (over_http, over_grpc):
            _drop_per_call_fields(message)
        assert over_http == over_grpc, route
        schema = {"$ref": f"#/components/schemas/{response_type.__name__}", "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(answer.body)
        if route == "segment":  # MedImageParse's form: {data, shape, dtype}, shape as numbers (int32), not strings
            assert answer.body["image_features"]["shape"] == [3, 1024, 1024]
            assert answer.body["image_features"]["encoding"] == "ARRAY_ENCODING_PACKBITS"


def _drop_per_call_fields(message: Any) -> None:
    """Stage timings and review routing (loop names, sampling) differ per call; everything else must match."""
    for name in ("timings", "review"):
        if message.DESCRIPTOR.fields_by_name.get(name) is not None:
            message.ClearField(name)
    for name in ("classification", "detection", "segmentation"):
        if message.DESCRIPTOR.fields_by_name.get(name) is not None and message.HasField(name):
            _drop_per_call_fields(getattr(message, name))


async def test_v1_refusals_name_the_field_and_never_quote_the_caller(http_client: Http) -> None:
    cases: list[tuple[Any, int, str, str]] = [
        ({"image": {"kind": PATIENT_NAME}}, 400, "INVALID_ARGUMENT", "image.kind is not a medgate.v1.InputKind name"),
        ({PATIENT_NAME: 1}, 400, "INVALID_ARGUMENT", "medgate.v1.SegmentRequest has an unknown field"),
        ({"image": {"data": PATIENT_NAME}}, 400, "INVALID_ARGUMENT", "image.data is not valid base64"),
        ({"prompts": 7}, 400, "INVALID_ARGUMENT", "prompts must be a string"),
        ({"boxes": {"x0": 1}}, 400, "INVALID_ARGUMENT", "boxes must be an array"),
        # Judged by the gateway's own validation, as for a gRPC caller: the same words.
        (
            {"image": {"data": "AAAA", "kind": 99}, "prompts": "heart"},
            400,
            "INVALID_ARGUMENT",
            "image.kind: 99 is not a valid medgate.v1.InputKind value",
        ),
        (
            {"image": {"data": "AAAA"}, "boxes": [{"x0": "NaN", "y0": 0, "x1": 5, "y1": 5}]},
            400,
            "INVALID_ARGUMENT",
            "boxes[0].x0 must be a finite number",
        ),
        ({"image": {"data": "AAAA"}}, 400, "INVALID_ARGUMENT", "at least one text prompt or box prompt"),
    ]
    for body, status, code, fragment in cases:
        answer = await http_client.post("/v1/segment", body)
        assert_error(answer, status, code, fragment)
        assert PATIENT_NAME not in answer.raw.decode()
    assert_error(await http_client.post("/v1/classify", b"{]"), 400, "INVALID_ARGUMENT", "not valid JSON")


async def test_openapi_is_generated_from_the_protos(http_client: Http) -> None:
    answer = await http_client.get("/openapi.json")
    assert answer.status == 200
    document = answer.body
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {"/score", "/v1/classify", "/v1/detect", "/v1/segment", "/v1/analyze"}
    schemas = document["components"]["schemas"]
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        if message.name in schemas and message.name != "AnalyzeStreamResponse":
            assert set(schemas[message.name]["properties"]) == {f.name for f in message.fields}
    assert (
        "MedImageParse text prompts separated by '&'"
        in schemas["SegmentRequest"]["properties"]["prompts"]["description"]
    )
    jsonschema.Draft202012Validator.check_schema({"components": document["components"]})


# Security: the shared gateway's tokens, over HTTP, as over gRPC.

needs_security = pytest.mark.skipif(not SECURE_FIXTURES, reason="the shared servers run without TLS and tokens")


def _token(credentials: DevCredentials, case: str) -> str | None:
    key = load_signing_key(credentials.signing_key)
    settings = load_settings(security=security_values(credentials.directory)).security
    good: dict[str, Any] = {
        "issuer": settings.issuer,
        "audience": settings.audience,
        "subject": "http-matrix",
        "roles": ["inference"],
    }
    if case == "none":
        return None
    if case == "expired":
        return mint_token(
            key, **good, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2), lifetime=dt.timedelta(hours=1)
        )
    if case == "wrong_audience":
        return mint_token(key, **{**good, "audience": "someone-else"})
    if case == "bad_signature":
        return mint_token(new_signing_key(kid=key.kid), **good)
    if case == "alg_none":
        return mint_token(None, **good, algorithm="none", headers={"kid": key.kid})
    if case in {"reviewer", "router", "admin"}:
        return mint_token(key, **{**good, "roles": [case]})
    return mint_token(key, **good)


TOKEN_CASES = {
    "none": 401,
    "garbage": 401,
    "expired": 401,
    "wrong_audience": 401,
    "bad_signature": 401,
    "alg_none": 401,
    "reviewer": 403,
    "router": 403,
    "admin": 403,
    "inference": 200,
}
ROUTES = ["/score", "/v1/classify", "/v1/detect", "/v1/segment", "/v1/analyze"]


@needs_security
async def test_every_route_x_every_token(http_client: Http, dev_credentials: DevCredentials) -> None:
    png = png_bytes(phantom(2).image[::4, ::4])
    bodies = {
        "/score": score_body((png, "heart")),
        **{route: {"image": {"data": base64.b64encode(png).decode()}} for route in ROUTES[1:4]},
        "/v1/analyze": {"image": {"data": base64.b64encode(png).decode()}, "prompts": "heart"},
    }
    bodies["/v1/segment"]["prompts"] = "heart"
    seen: dict[tuple[str, str], int] = {}
    for case, expected in TOKEN_CASES.items():
        token = "not.a.jwt" if case == "garbage" else _token(dev_credentials, case)
        for route in ROUTES:
            answer = await http_client.post(route, bodies[route], token=token or None)
            seen[(route, case)] = answer.status
            if expected == 401:
                assert answer.headers.get("www-authenticate", "").startswith("Bearer")
                assert answer.error["status"] == "UNAUTHENTICATED"
            if expected == 403:
                assert answer.error["status"] == "PERMISSION_DENIED"
    assert seen == {(route, case): expected for case, expected in TOKEN_CASES.items() for route in ROUTES}


@needs_security
async def test_no_token_is_refused_before_the_body_is_read(http_client: Http) -> None:
    answer = await asyncio.to_thread(_declared_length_only, Http(http_client.port, http_client.ca_file), 10**9)
    assert_error(answer, 401, "UNAUTHENTICATED")  # not 413: nothing about the request is judged before the token


@needs_security
async def test_http_calls_are_audited_as_grpc_calls_are(
    http_client: Http, gateway: GatewayServer, dev_credentials: DevCredentials
) -> None:
    from tests.test_audit_rpc import assert_no_canary, events_soon, what, who

    data = dicom_bytes(phantom(6).image)
    call_id = f"http-{uuid.uuid4().hex[:12]}"
    body = {"image": {"data": base64.b64encode(data).decode()}, "prompts": "heart"}
    answer = await http_client.post("/v1/segment", body, headers={"X-Request-Id": call_id, "X-Patient": PATIENT_NAME})
    assert answer.status == 200
    (event,) = await events_soon(gateway.audit.directory, call_id, 1)
    assert what(event) == ("110103", "R", "OK")
    assert event["medgate"]["rpc"] == "/medgate.v1.Inference/Segment"
    (study,) = event["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == answer.body["image"]["study_instance_uid"]
    person = who(event)
    assert person["UserID"] == SUBJECTS[Role.INFERENCE]
    assert [code["csd-code"] for code in person["RoleIDCode"]] == [Role.INFERENCE.value]
    # Each /score item is one audited Segment call under the request's id.
    score_id = f"http-{uuid.uuid4().hex[:12]}"
    png = png_bytes(phantom(7).image[::4, ::4])
    scored = await http_client.post(
        "/score", score_body((data, "heart"), (png, "lungs")), headers={"X-Request-Id": score_id}
    )
    assert scored.status == 200
    recorded = await events_soon(gateway.audit.directory, score_id, 2)
    assert sorted(what(e) for e in recorded) == [("110103", "R", "OK")] * 2
    # Refusals are recorded like gRPC refusals: User Authentication and Security Alert.
    anonymous = f"http-{uuid.uuid4().hex[:12]}"
    refused = await http_client.post("/v1/classify", body, token=None, headers={"X-Request-Id": anonymous})
    assert refused.status == 401
    (event,) = await events_soon(gateway.audit.directory, anonymous, 1)
    assert what(event)[0] == "110114"
    denied = f"http-{uuid.uuid4().hex[:12]}"
    reviewer = dev_credentials.token(Role.REVIEWER)
    classify = {"image": body["image"]}  # a valid body: only the role is wrong
    refused = await http_client.post("/v1/classify", classify, token=reviewer, headers={"X-Request-Id": denied})
    assert refused.status == 403
    (event,) = await events_soon(gateway.audit.directory, denied, 1)
    assert what(event)[0] == "110113"
    assert_no_canary(gateway)


# The listener: TLS re-read, mutual TLS, plaintext only on loopback (no Triton: /openapi.json needs no call).


def _listener_settings(directory: Path, **security: Any) -> Any:
    return load_settings(
        gateway={"http_host": "127.0.0.1"},
        security=security_values(directory, audit_dir=directory / "audit", **security),
    )


async def _started(settings: Any) -> HttpServer:
    face = HttpServer(settings)
    face.bind_loopback(grpc.aio.server())  # never started: /openapi.json makes no call
    await face.start(any_port=True)
    return face


def _peer_certificate(port: int, *, client: tuple[Path, Path] | None = None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if client is not None:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head = tls.recv(12)
        if not head:  # TLS 1.3: a refused client certificate shows once the server has read it
            raise ConnectionError("closed by the server")
        assert head.startswith(b"HTTP/1.1 200")
        certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate


async def test_listener_re_reads_a_renewed_certificate(tmp_path: Path) -> None:
    first = ensure_dev_credentials(load_settings(security=security_values(tmp_path / "one")).security)
    second = ensure_dev_credentials(load_settings(security=security_values(tmp_path / "two")).security)
    live = tmp_path / "live"
    shutil.copytree(first.directory, live)
    face = await _started(_listener_settings(live))
    try:
        before = await asyncio.to_thread(_peer_certificate, face.port)
        assert before == ssl.PEM_cert_to_DER_cert((first.directory / "server.pem").read_text())
        await asyncio.sleep(1.1)
        for name in ("server.pem", "server.key"):
            shutil.copyfile(second.directory / name, live / name)
        deadline = time.monotonic() + 5
        after = before
        while after == before and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            after = await asyncio.to_thread(_peer_certificate, face.port)
        assert after == ssl.PEM_cert_to_DER_cert((second.directory / "server.pem").read_text())
    finally:
        await face.stop()


async def test_listener_mutual_tls_and_plaintext_rules(tmp_path: Path) -> None:
    credentials = ensure_dev_credentials(load_settings(security=security_values(tmp_path / "c")).security)
    face = await _started(_listener_settings(credentials.directory, require_client_cert=True))
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(_peer_certificate, face.port)
        client = (credentials.directory / "client.pem", credentials.directory / "client.key")
        assert await asyncio.to_thread(_peer_certificate, face.port, client=client)
    finally:
        await face.stop()
    plain = load_settings(gateway={"http_host": "0.0.0.0"}, security={"tls": False, "audit_dir": tmp_path / "audit"})
    with pytest.raises(RuntimeError, match=r"refusing to listen on 0\.0\.0\.0 without TLS"):
        await _started(plain)
    loopback = load_settings(gateway={"http_host": "127.0.0.1"}, security={"tls": False, "audit_dir": tmp_path / "a"})
    face = await _started(loopback)
    try:
        answer = await Http(face.port, None, host="127.0.0.1").get("/openapi.json")
        assert answer.status == 200
    finally:
        await face.stop()


# The pure modules.


def test_score_request_schema() -> None:
    png = png_bytes(np.zeros((4, 4), np.uint8))

    def parse(body: Any) -> list[score.ScoreItem]:
        return score.parse_score_request(body, max_items=3, max_masks=5)

    (item,) = parse(SEED_REQUEST)
    assert item.image == base64.b64decode(SEED_PNG_BASE64) and item.prompts == SEED_PROMPTS
    one_line = score_body((png, "heart"))
    one_line["input_data"]["data"][0][0] = base64.b64encode(png).decode()  # no line breaks: the same bytes
    assert parse(one_line)[0].image == png
    urlsafe = score_body((png, "heart"))
    urlsafe["input_data"]["data"][0][0] = base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert parse(urlsafe)[0].image == png
    with pytest.raises(RequestTooLarge, match="4 items; at most 3"):
        parse(score_body(*[(png, "a")] * 4))
    with pytest.raises(RequestTooLarge, match="6 masks"):
        parse(score_body((png, "a & b & c"), (png, "a & b & c")))
    broken_bodies: list[Any] = [
        {},
        {"input_data": []},
        {"input_data": {"columns": ["image", "text"], "index": [0], "data": [], "extra": 1}},
        {"input_data": {"columns": ["image", "image"], "index": [0], "data": [["x", "y"]]}},
        {"input_data": {"columns": ["image", "text", "text"], "index": [0], "data": [["x", "y"]]}},
        {"input_data": {"columns": ["image", "text"], "index": [0], "data": []}},
        {"input_data": {"columns": ["image", "text"], "index": [True], "data": [["AAAA", "y"]]}},
        {"input_data": {"columns": ["image", "text"], "index": [0], "data": [["", "y"]]}},
        {"input_data": {"columns": ["image", "text"], "index": [0], "data": [["AAAA", None]]}},
        {"input_data": {"columns": ["image", "text"], "index": [0], "data": [["AA$A", "y"]]}},
    ]
    for broken in broken_bodies:
        with pytest.raises(BadRequest):
            parse(broken)


def test_score_answer_is_medimageparse_shaped() -> None:
    masks = np.zeros((2, 1024, 1024), np.uint8)
    masks[1, 10:20, 30:40] = 1
    response = pb.SegmentResponse(
        image_features=pb.NDArray(data=masks.tobytes(), shape=[2, 1024, 1024], dtype="uint8"),
        text_features=["liver", "pancreas"],
        prompts=[pb.PromptResult(prompt="liver", category="liver", score=0.5, area_pixels=0)],
    )
    pieces = score.score_answer(response)
    item = json.loads(b"".join(pieces))
    assert json.loads(item["image_features"]) == {
        "data": base64.b64encode(masks.tobytes()).decode(),
        "shape": [2, 1024, 1024],
        "dtype": "uint8",
    }
    assert np.array_equal(seed_decode(item), masks)
    assert json.loads(score.score_answers([pieces, pieces])) == [item, item]
    assert item["text_features"] == ["liver", "pancreas"] and item["scores"] == [0.5]
    assert item["prompts"][0]["area_pixels"] == "0"  # the JSON mapping's int64


def test_json_mapping_errors_never_quote_the_caller() -> None:
    canary = "Doe^Jane"
    for body in (
        {canary: 1},
        {"image": {"kind": canary}},
        {"image": {"data": canary}},
        {"image": {"frame": canary}},
        {"image": {"window": canary}},
        {"boxes": [canary]},
        {"output": {"dicom_results": canary}},
        {"image": {"data": "AAAA", "array": {"data": "AAAA"}}},
        {"prompts": "\ud800"},
        {"image": {"frame": 2**40}},
    ):
        with pytest.raises(protojson.JsonFieldError) as refused:
            protojson.parse(pb.SegmentRequest, body)
        assert canary not in str(refused.value)
    parsed = protojson.parse(
        pb.AnalyzeRequest,
        {
            "image": {"data": "aGVs\nbG8=", "kind": 2, "frame": "3"},
            "tasks": ["TASK_DETECT", 3],
            "minScore": "NaN",
            "max_detections": 4.0,
            "boxes": None,
        },
    )
    assert parsed.image.data == b"hello" and parsed.image.kind == pb.INPUT_KIND_PNG and parsed.image.frame == 3
    assert list(parsed.tasks) == [pb.TASK_DETECT, pb.TASK_SEGMENT] and np.isnan(parsed.min_score)
    assert parsed.max_detections == 4
    assert protojson.parse(pb.ImageInput, {"kind": 99}).kind == 99  # the gateway's validation judges it


def test_proto_comments() -> None:
    text = """
// The service.
service Inference {
  // Classify it.
  rpc Classify(A) returns (B);
}
// A box.
message Box {
  float x0 = 1;  // left
  // Top.
  float y0 = 2;
  oneof source {
    // Bytes.
    bytes data = 3;
  }
}
enum Kind {
  // Automatic.
  KIND_AUTO = 0;
}
"""
    found = openapi.proto_comments(text)
    assert found == {
        "rpc.Classify": "Classify it.",
        "Box": "A box.",
        "Box.x0": "left",
        "Box.y0": "Top.",
        "Box.data": "Bytes.",
        "Kind.KIND_AUTO": "Automatic.",
    }


def test_json_answers_splice_large_bytes_exactly() -> None:
    masks = np.random.default_rng(0).integers(0, 2, (3, 1024, 1024), dtype=np.uint8)
    response = pb.AnalyzeResponse(
        segmentation=pb.SegmentResponse(
            image_features=pb.NDArray(data=masks.tobytes(), shape=[3, 1024, 1024], dtype="uint8"),
            original_masks=pb.NDArray(data=masks[:, :500].tobytes(), shape=[3, 500, 1024], dtype="uint8"),
            text_features=["lung"],
        ),
        dicom_results=[pb.DicomObject(data=b"S" * 100_000, kind="SEG"), pb.DicomObject(data=b"small", kind="SR")],
        request_id="r1",
    )
    expected = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert json.loads(protojson.to_json(response)) == expected
    assert json.loads(protojson.to_json(pb.SegmentResponse())) == protojson.to_dict(pb.SegmentResponse())


async def test_http_calls_share_the_access_log_and_request_counts(
    http_client: Http, caplog: pytest.LogCaptureFixture
) -> None:
    from services.metrics import REQUESTS

    caplog.set_level(logging.INFO, logger="medgate.gateway")
    png = base64.b64encode(png_bytes(phantom(8).image[::4, ::4])).decode()
    before = REQUESTS.labels(rpc="Classify", code="OK")._value.get()
    answer = await http_client.post("/v1/classify", {"image": {"data": png}}, headers={"X-Request-Id": "http-log-1"})
    assert answer.status == 200
    deadline = time.monotonic() + 5
    while not (lines := [r for r in caplog.records if getattr(r, "request_id", "") == "http-log-1"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    (line,) = lines
    assert line.__dict__["event"] == "rpc" and line.__dict__["rpc"] == "Classify" and line.__dict__["code"] == "OK"
    assert REQUESTS.labels(rpc="Classify", code="OK")._value.get() == before + 1
    # A refusal of the face itself (no gRPC call): its own line and count, without the body's text.
    refused_before = REQUESTS.labels(rpc="http/score", code="INVALID_ARGUMENT")._value.get()
    refused = await http_client.post("/score", b'{"' + PATIENT_NAME.encode(), headers={"X-Request-Id": "http-log-2"})
    assert refused.status == 400
    (line,) = [r for r in caplog.records if getattr(r, "request_id", "") == "http-log-2"]
    assert line.__dict__["event"] == "http" and line.__dict__["code"] == "INVALID_ARGUMENT"
    assert REQUESTS.labels(rpc="http/score", code="INVALID_ARGUMENT")._value.get() == refused_before + 1
    assert PATIENT_NAME not in caplog.text
