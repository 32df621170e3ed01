"""The audit trail of the real servers: one event per access with the right who, what and outcome, and no patient data.

The review service runs here with tokens on (a signing key of the test's own) so the events carry
the verified identity; the gateway tests use the shared gateway (TLS and the development tokens)
and find their events by request id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import inference_pb2_grpc as ipb_grpc
from medgate.v1 import report_pb2, report_pb2_grpc
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.audit import AuditWriteError
from services.gateway.server import GatewayServer
from services.review.server import ReviewServer
from services.rpc.interceptors.audit import RPC_EVENTS, WITHHELD
from services.security.credentials import (
    CLIENT_COMMON_NAME,
    SUBJECTS,
    DevCredentials,
    SigningKey,
    jwks_json,
    mint_token,
    new_signing_key,
)
from services.security.identity import Role
from services.settings import SecuritySettings, load_settings
from tests.conftest import SECURE_FIXTURES, security_values
from tests.fixtures import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME, dicom_bytes, phantom, png_bytes
from tests.test_review_service import start_request, write_flows

CANARIES = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, "Doe^Jane")
# A request's metadata as a careless client sends it: a patient's name in headers of its own.
CANARY_METADATA = (("x-patient-name", PATIENT_NAME), ("x-patient-id", PATIENT_ID))


def events(directory: Path, request_id: str | None = None) -> list[dict[str, Any]]:
    found = [json.loads(line) for path in sorted(directory.glob("audit-*.jsonl")) for line in path.open()]
    if request_id is None:
        return found
    return [e for e in found if e.get("medgate", {}).get("request_id") == request_id]


def everything_in(directory: Path) -> str:
    return "".join(path.read_text() for path in sorted(directory.glob("audit-*.jsonl")))


def what(event: dict[str, Any]) -> tuple[str, str, str]:
    identification = event["EventIdentification"]
    return (
        identification["EventID"]["csd-code"],
        identification["EventActionCode"],
        identification["EventOutcomeDescription"],
    )


def objects(event: dict[str, Any]) -> list[str]:
    return [o["ParticipantObjectID"] for o in event.get("ParticipantObjectIdentification", [])]


def who(event: dict[str, Any]) -> dict[str, Any]:
    (requestor,) = [p for p in event["ActiveParticipant"] if p["UserIsRequestor"]]
    return dict(requestor)


async def events_soon(directory: Path, request_id: str, count: int, timeout_s: float = 5) -> list[dict[str, Any]]:
    """The call's events once there are ``count``.

    A refusal reaches the caller as the status boundary sends it, and a stream's closing event is
    written after the client left; only the events of granted accesses are on disk before the answer.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(found := events(directory, request_id)) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return found


def rid() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


# The review service, tokens on.


@dataclasses.dataclass
class Review:
    server: ReviewServer
    stub: pb_grpc.ReviewStub
    audit_dir: Path
    key: SigningKey
    security: SecuritySettings

    def token(self, subject: str, role: str, name: str = "") -> str:
        return mint_token(
            self.key,
            issuer=self.security.issuer,
            audience=self.security.audience,
            subject=subject,
            roles=[role],
            claims={"preferred_username": name} if name else None,
        )

    def as_(self, token: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        return (*auth, ("x-request-id", request_id), *CANARY_METADATA)


@pytest.fixture
async def review(tmp_path: Path) -> AsyncIterator[Review]:
    key = new_signing_key(kid="audit-test")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(jwks_json(key))
    settings = load_settings(
        review={
            "store_path": tmp_path / "review.sqlite3",
            "flows_file": write_flows(tmp_path),
            "port": 0,
            "housekeeping_interval_s": 0.1,
        },
        security={"tls": False, "auth": True, "jwks_file": jwks, "oidc_issuer": "", "audit_dir": tmp_path / "audit"},
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Review(server, pb_grpc.ReviewStub(channel), tmp_path / "audit", key, settings.security)
    await server.stop()


async def first_case(review: Review, token: str, request_id: str) -> pb.ReviewCase:
    stream = review.stub.StreamCases(
        pb.StreamCasesRequest(flow_definitions=["single"], max_in_flight=1), metadata=review.as_(token, request_id)
    )
    try:
        async for case in stream:
            return case
        raise AssertionError("stream ended without a case")
    finally:
        stream.cancel()


async def test_every_review_access_is_one_event_with_who_what_and_outcome(review: Review) -> None:
    admin = review.token("admin-1", "admin", "Ada Admin")
    reviewer = review.token("dr-lee", "reviewer", "Dr Lee")
    issuer = review.security.issuer

    started = rid()
    request = start_request("case-a")
    request.input_content_json = json.dumps({**json.loads(request.input_content_json), "patient": PATIENT_NAME})
    await review.stub.StartHumanLoop(request, metadata=review.as_(admin, started))
    (event,) = events(review.audit_dir, started)
    assert what(event) == ("110103", "C", "OK") and objects(event) == ["case-a", "single"]
    person = who(event)
    assert (person["UserID"], person["AlternativeUserID"], person["UserName"]) == ("admin-1", issuer, "Ada Admin")
    assert [r["csd-code"] for r in person["RoleIDCode"]] == ["admin"]
    assert person["NetworkAccessPointID"] == "127.0.0.1" and person["NetworkAccessPointTypeCode"] == "2"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 0

    streamed = rid()
    case = await first_case(review, reviewer, streamed)
    delivered = events(review.audit_dir, streamed)[0]
    assert what(delivered) == ("110103", "R", "OK") and objects(delivered) == ["case-a", "single"]
    assert who(delivered)["UserID"] == "dr-lee" and who(delivered)["UserName"] == "Dr Lee"

    decided = rid()
    answer = pb.ReviewAnswer(label="normal", comment=f"seen {PATIENT_NAME}")
    submit = pb.SubmitReviewRequest(decision_id="d-1", delivery_id=case.delivery_id, answer=answer)
    await review.stub.SubmitReview(submit, metadata=review.as_(reviewer, decided))
    (event,) = events(review.audit_dir, decided)
    assert what(event) == ("110103", "U", "OK") and objects(event) == ["case-a", "single"]
    assert who(event)["UserID"] == "dr-lee"

    denied = rid()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await review.stub.DeleteHumanLoop(
            pb.DeleteHumanLoopRequest(name="case-a"), metadata=review.as_(reviewer, denied)
        )
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (event,) = await events_soon(review.audit_dir, denied, 1)
    assert what(event) == ("110113", "E", "PERMISSION_DENIED")
    assert event["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110132"  # Use of Restricted Function
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert objects(event) == ["/medgate.v1.Review/DeleteHumanLoop", "case-a"]
    assert who(event)["UserID"] == "dr-lee" and [r["csd-code"] for r in who(event)["RoleIDCode"]] == ["reviewer"]

    anonymous = rid()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await review.stub.ListHumanLoops(pb.ListHumanLoopsRequest(), metadata=review.as_(None, anonymous))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (event,) = await events_soon(review.audit_dir, anonymous, 1)
    assert what(event) == ("110114", "E", "UNAUTHENTICATED")
    assert event["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110122"  # Login
    assert who(event)["UserID"] == "anonymous" and who(event)["NetworkAccessPointID"] == "127.0.0.1"
    assert objects(event) == ["/medgate.v1.Review/ListHumanLoops"]

    forged = rid()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await review.stub.ListHumanLoops(pb.ListHumanLoopsRequest(), metadata=review.as_(admin[:-4] + "AAAA", forged))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (event,) = await events_soon(review.audit_dir, forged, 1)
    assert what(event) == ("110114", "E", "UNAUTHENTICATED") and who(event)["UserID"] == "anonymous"

    listed = rid()
    await review.stub.ListHumanLoops(
        pb.ListHumanLoopsRequest(flow_definition="single"), metadata=review.as_(admin, listed)
    )
    (event,) = events(review.audit_dir, listed)
    assert what(event) == ("110112", "R", "OK") and objects(event) == ["/medgate.v1.Review/ListHumanLoops", "single"]
    destination = [p for p in event["ActiveParticipant"] if not p["UserIsRequestor"]]
    assert [p["RoleIDCode"][0]["csd-code"] for p in destination] == ["110152"]  # the review service answered

    for rpc, action in (("StopHumanLoop", "U"), ("DeleteHumanLoop", "D")):
        call_id = rid()
        message = getattr(pb, f"{rpc}Request")(name="case-a")
        try:
            await getattr(review.stub, rpc)(message, metadata=review.as_(admin, call_id))
            outcome = "OK"
        except grpc.aio.AioRpcError as exc:  # a completed loop cannot be stopped: still an event
            outcome = exc.code().name
        (event,) = await events_soon(review.audit_dir, call_id, 1)
        assert what(event) == ("110103", action, outcome) and objects(event)[0] == "case-a"

    everything = everything_in(review.audit_dir)
    assert not [canary for canary in CANARIES if canary in everything]
    assert "seen " not in everything and "x-patient" not in everything


async def test_a_stream_records_each_case_before_it_is_sent_and_how_it_ended(review: Review) -> None:
    admin, reviewer = review.token("admin-1", "admin"), review.token("dr-kim", "reviewer")
    for name in ("case-s1", "case-s2"):
        await review.stub.StartHumanLoop(start_request(name), metadata=review.as_(admin, rid()))
    streamed = rid()
    stream = review.stub.StreamCases(
        pb.StreamCasesRequest(flow_definitions=["single"], max_in_flight=2), metadata=review.as_(reviewer, streamed)
    )
    received = []
    async for case in stream:
        # On disk before it arrived (the next case's event may be there too: the server runs ahead of us).
        assert any(case.human_loop_name in objects(e) for e in events(review.audit_dir, streamed))
        received.append(case.human_loop_name)
        if len(received) == 2:
            break
    stream.cancel()
    recorded = await events_soon(review.audit_dir, streamed, 3)  # the closing event follows the cancel
    assert [objects(e)[0] for e in recorded[:2]] == received
    assert [what(e) for e in recorded] == [("110103", "R", "OK")] * 2 + [("110103", "R", "CANCELLED")]
    assert objects(recorded[-1]) == ["single"]  # what the reviewer subscribed to
    start = events(review.audit_dir)[0]
    assert start["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110120"  # Application Start, first
    assert start["ActiveParticipant"][0]["UserID"] == "medgate-review"


async def test_an_access_that_cannot_be_recorded_is_not_granted(
    review: Review, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, reviewer = review.token("admin-1", "admin"), review.token("dr-lee", "reviewer")
    await review.stub.StartHumanLoop(start_request("case-f"), metadata=review.as_(admin, rid()))

    def disk_full(name: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    assert review.server.audit is not None
    monkeypatch.setattr(review.server.audit, "_append", disk_full)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await review.stub.DescribeHumanLoop(
            pb.DescribeHumanLoopRequest(name="case-f"), metadata=review.as_(admin, rid())
        )
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and failure.value.details() == WITHHELD
    stream = review.stub.StreamCases(
        pb.StreamCasesRequest(flow_definitions=["single"], max_in_flight=1), metadata=review.as_(reviewer, rid())
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for case in stream:
            raise AssertionError(f"case {case.human_loop_name} was delivered without an audit event")
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    # A refusal is answered as it would be: there is nothing to withhold.
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await review.stub.ListHumanLoops(pb.ListHumanLoopsRequest(), metadata=review.as_(None, rid()))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.undo()
    described = rid()
    await review.stub.DescribeHumanLoop(
        pb.DescribeHumanLoopRequest(name="case-f"), metadata=review.as_(admin, described)
    )
    assert [what(e) for e in events(review.audit_dir, described)] == [("110112", "R", "OK")]


async def test_a_server_that_cannot_audit_does_not_start(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": write_flows(tmp_path), "port": 0},
        security={"tls": False, "auth": False, "audit_dir": blocked / "audit"},
    )
    server = ReviewServer(settings.review, settings.security)
    with pytest.raises(AuditWriteError):
        await server.start(port=0)
    await server.stop()


# The gateway (the shared fixture, as `make run` serves it: TLS and the development inference token).


async def gateway_events(gateway: GatewayServer, request_id: str, count: int = 1) -> list[dict[str, Any]]:
    return await events_soon(gateway.audit.directory, request_id, count)


def assert_shared_caller(event: dict[str, Any]) -> None:
    """The shared gateway's client: the development inference token (or anonymous, when the fixtures are plain)."""
    person = who(event)
    assert person["NetworkAccessPointID"] == "127.0.0.1"
    if not SECURE_FIXTURES:
        assert person["UserID"] == "anonymous"
        return
    assert person["UserID"] == SUBJECTS[Role.INFERENCE]
    assert person["AlternativeUserID"] == load_settings().security.issuer
    assert [code["csd-code"] for code in person["RoleIDCode"]] == [Role.INFERENCE.value]


def assert_no_canary(gateway: GatewayServer) -> None:
    everything = everything_in(gateway.audit.directory)
    assert not [canary for canary in CANARIES if canary in everything]
    assert "x-patient" not in everything


async def test_inference_on_dicom_records_the_study_and_instance(
    stub: ipb_grpc.InferenceStub, gateway: GatewayServer
) -> None:
    call_id = rid()
    data = dicom_bytes(phantom(3).image)
    metadata = (("x-request-id", call_id), *CANARY_METADATA)
    response = await stub.Classify(ipb.ClassifyRequest(image=ipb.ImageInput(data=data)), metadata=metadata)
    (event,) = events(gateway.audit.directory, call_id)  # on disk before the answer
    assert what(event) == ("110103", "R", "OK")
    (study,) = event["ParticipantObjectIdentification"]
    image = response.image
    assert study["ParticipantObjectID"] == image.study_instance_uid and image.study_instance_uid
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": image.sop_class_uid, "NumberOfInstances": 1, "Instance": [{"UID": image.sop_instance_uid}]}
    ]
    assert_shared_caller(event)
    assert event["medgate"]["rpc"] == "/medgate.v1.Inference/Classify"
    assert_no_canary(gateway)


async def test_inference_without_uids_and_failed_inference_are_recorded(
    stub: ipb_grpc.InferenceStub, gateway: GatewayServer
) -> None:
    png = rid()
    await stub.Classify(
        ipb.ClassifyRequest(image=ipb.ImageInput(data=png_bytes(phantom(4).image))), metadata=(("x-request-id", png),)
    )
    (event,) = events(gateway.audit.directory, png)  # on disk before the answer
    assert what(event) == ("110103", "R", "OK") and objects(event) == []
    bad = rid()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Detect(
            ipb.DetectRequest(image=ipb.ImageInput(data=b"DICM" + PATIENT_NAME.encode())),
            metadata=(("x-request-id", bad),),
        )
    (event,) = await gateway_events(gateway, bad)
    assert what(event) == ("110103", "R", failure.value.code().name)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert_no_canary(gateway)


async def test_a_batch_stream_records_each_item(stub: ipb_grpc.InferenceStub, gateway: GatewayServer) -> None:
    call_id = rid()
    items = [
        ipb.AnalyzeRequest(image=ipb.ImageInput(data=dicom_bytes(phantom(5).image)), request_id="a"),
        ipb.AnalyzeRequest(image=ipb.ImageInput(data=b"not an image"), request_id="b"),
    ]
    answers = [a async for a in stub.AnalyzeStream(iter(items), metadata=(("x-request-id", call_id),))]
    failed = next(a for a in answers if a.WhichOneof("result") == "error")
    ok = next(a for a in answers if a.WhichOneof("result") == "response")
    recorded = await gateway_events(gateway, call_id, 3)
    assert len(recorded) == 3 and what(recorded[-1]) == ("110103", "R", "OK")  # two items, then the stream
    assert sorted(what(e)[2] for e in recorded[:2]) == sorted(["OK", failed.error.code_name])
    (with_study,) = [e for e in recorded[:2] if objects(e)]
    assert objects(with_study) == [ok.response.image.study_instance_uid]
    assert_no_canary(gateway)


async def test_a_report_call_is_recorded_without_its_text(
    report_stub: report_pb2_grpc.ReportStub, gateway: GatewayServer
) -> None:
    call_id = rid()
    findings = f"Patient {PATIENT_NAME} born {PATIENT_BIRTH_DATE}. The heart is normal in size. The lungs are clear."
    await report_stub.Impression(report_pb2.ImpressionRequest(findings=findings), metadata=(("x-request-id", call_id),))
    (event,) = events(gateway.audit.directory, call_id)  # on disk before the answer
    assert what(event) == ("110103", "R", "OK") and objects(event) == []
    assert "heart" not in everything_in(gateway.audit.directory)
    assert_no_canary(gateway)


async def test_under_mutual_tls_the_calling_node_is_a_participant(
    dev_credentials: DevCredentials, tmp_path: Path
) -> None:
    security = security_values(dev_credentials.directory, require_client_cert=True, audit_dir=tmp_path / "audit")
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": write_flows(tmp_path), "port": 0},
        security=security,
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    credentials = grpc.ssl_channel_credentials(
        dev_credentials.ca_cert.read_bytes(),
        private_key=dev_credentials.client_key.read_bytes(),
        certificate_chain=dev_credentials.client_cert.read_bytes(),
    )
    try:
        async with grpc.aio.secure_channel(f"localhost:{server.port}", credentials) as channel:
            stub = pb_grpc.ReviewStub(channel)
            listed, refused = rid(), rid()
            token = dev_credentials.token(Role.REVIEWER)
            await stub.ListFlowDefinitions(
                pb.ListFlowDefinitionsRequest(),
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", listed)),
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest(), metadata=(("x-request-id", refused),))
    finally:
        await server.stop()
    for call_id, person in ((listed, SUBJECTS[Role.REVIEWER]), (refused, "anonymous")):
        (event,) = events(tmp_path / "audit", call_id)
        caller, machine = [p for p in event["ActiveParticipant"] if p["UserIsRequestor"]]
        assert caller["UserID"] == person
        assert CLIENT_COMMON_NAME in machine["UserID"] and machine["RoleIDCode"][0]["csd-code"] == "110153"
        assert machine["NetworkAccessPointID"] == "127.0.0.1"


def test_every_rpc_of_every_service_has_its_event() -> None:
    services = [
        ipb.DESCRIPTOR.services_by_name["Inference"],
        report_pb2.DESCRIPTOR.services_by_name["Report"],
        pb.DESCRIPTOR.services_by_name["Review"],
    ]
    assert {f"/{service.full_name}/{method.name}" for service in services for method in service.methods} == set(
        RPC_EVENTS
    )
