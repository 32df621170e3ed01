"""A reviewer's verified result, end to end: real DICOM through the real gateway and Triton, a real review
service, the DICOM node and a real Orthanc.

1. RG1_UNCI.dcm (pydicom-data) classified through the gateway with ``output.dicom_results``; the answer is
   routed to review, a reviewer corrects the class over gRPC (the reviewer's token), and the VERIFIED SR
   lands in the DICOM node's inbox (no node running: it waits there).
2. CT_small.dcm sent to the node with dcmtk's storescu: the node's Analyze puts the AI SR into Orthanc
   and the gateway routes the answer to review; the reviewer corrects the class and moves a box, and the
   two VERIFIED SRs reach Orthanc in the source's study, with the reviewer as verifying observer and the
   AI SR as predecessor document (checked through Orthanc's REST API).

Every answer is routed (the flows sample 100%): the activation conditions have their own tests; here the
hook-up from a completed loop to the PACS is under test. Orthanc and dciodvfy skip locally without them
and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pydicom
import pytest

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import inference_pb2_grpc as ipb_grpc
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.dicom.node.node import DicomNode
from services.gateway.server import GatewayServer
from services.imaging.preprocess import Letterbox
from services.review.completion import HANDED_OVER, config_from
from services.review.server import ReviewServer
from services.security.credentials import SUBJECTS
from services.security.identity import Role
from services.settings import Settings, load_settings
from tests.conftest import Clients
from tests.fixtures import pydicom_data_file, unavailable
from tests.orthanc import Orthanc, OrthancUnavailable
from tests.test_dicom_results import dciodvfy_errors
from tests.test_dicom_verified import classification_of, content_items, polylines

pytestmark = pytest.mark.triton

ALWAYS = '{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}'
FLOWS = f"""
[[flows]]
name = "verified-cls"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 120
activation_conditions = '{ALWAYS}'

[[flows]]
name = "verified-det"
task_type = "detection"
categories = ["lesion"]
task_count = 1
task_time_limit_s = 120
activation_conditions = '{ALWAYS}'
"""
ROUTES = """
[[route]]
name = "ct-classify-detect"
modality = ["CT"]
tasks = ["classify", "detect"]
"""
REVIEWER = SUBJECTS[Role.REVIEWER]
MIB = 1024 * 1024


def _unavailable(reason: str) -> NoReturn:
    unavailable(reason, "the verified-result tests")


@dataclass
class Stack:
    settings: Settings
    review: ReviewServer
    gateway: GatewayServer
    node_outbox: Path
    root: Path

    @property
    def inbox(self) -> Path:
        return self.node_outbox / "inbox"


@pytest.fixture(scope="module")
async def stack(
    triton_url: str, tmp_path_factory: pytest.TempPathFactory, shared_security: dict[str, Any]
) -> AsyncIterator[Stack]:
    """A review service that writes verified results to a node's outbox, and a gateway routing to it (TLS, tokens)."""
    root = tmp_path_factory.mktemp("verified")
    (root / "flows.toml").write_text(FLOWS)
    (root / "routes.toml").write_text(ROUTES)
    settings = load_settings(
        gateway={"port": 0, "metrics_port": 0, "http_enabled": False},
        review={
            "port": 0,
            "web_enabled": False,
            "flows_file": root / "flows.toml",
            "store_path": root / "review.sqlite3",
            "outbox_dir": root / "review-outbox",
            "outbox_retry_interval_s": 0.5,
            "housekeeping_interval_s": 0.5,
            "verified_dicom_retry_interval_s": 0.5,
            "organization": "Radiology",
        },
        dicom={"enabled": True, "outbox_dir": root / "node-outbox"},
        report={"enabled": False},
        security=shared_security,
    )
    assert config_from(settings, node_here=False) is None  # `medgate review serve` alone: no node beside it
    config = config_from(settings, node_here=True)
    assert config is not None and config.handover_dir == root / "node-outbox"
    review = ReviewServer(settings.review, settings.security, verified=config)
    await review.start(port=0)
    routed = load_settings(
        gateway={"port": 0, "metrics_port": 0, "http_enabled": False},
        review={
            "url": f"127.0.0.1:{review.port}",
            "flows_file": root / "flows.toml",
            "outbox_dir": root / "review-outbox",
            "outbox_retry_interval_s": 0.5,
        },
        report={"enabled": False},
        security=shared_security,
    )
    gateway = GatewayServer(routed, triton_url)
    await gateway.start(port=0)
    try:
        yield Stack(routed, review, gateway, root / "node-outbox", root)
    finally:
        await gateway.stop()
        await review.stop()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    try:
        server = Orthanc(modalities={"medgate": ("MEDGATE", "127.0.0.1", 11112)})
    except OrthancUnavailable as exc:
        _unavailable(str(exc))
    server.start()
    yield server
    server.close()


async def wait_for(check: Any, *, timeout_s: float = 180.0, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def instance_file(orthanc: Orthanc, instance_id: str) -> bytes:
    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance_id}/file", timeout=30) as answer:
        return bytes(answer.read())


async def review_one(clients: Clients, stack: Stack, flow: str, decide: Any) -> tuple[pb.ReviewCase, pb.HumanLoop]:
    """Take the next case of ``flow`` as the session's reviewer (token) and answer it with ``decide(case)``."""
    async with clients.channel(f"127.0.0.1:{stack.review.port}", Role.REVIEWER) as channel:
        stub = pb_grpc.ReviewStub(channel)
        stream = stub.StreamCases(pb.StreamCasesRequest(flow_definitions=[flow]))
        case = await asyncio.wait_for(stream.read(), timeout=120)
        stream.cancel()
        request = pb.SubmitReviewRequest(
            decision_id=f"{case.human_loop_name}-decision", delivery_id=case.delivery_id, answer=decide(case)
        )
        return case, (await stub.SubmitReview(request)).human_loop


def other_label(case: pb.ReviewCase) -> str:
    top = case.scores[0].label
    return next(c for c in case.categories if c != top)


def verifies(tags: dict[str, Any], ai_sr_uid: str, study_uid: str) -> bool:
    """Orthanc's tags of a VERIFIED SR that names the reviewer and the AI SR it verifies."""
    if tags.get("VerificationFlag") != "VERIFIED" or tags.get("StudyInstanceUID") != study_uid:
        return False
    observers = tags.get("VerifyingObserverSequence") or [{}]
    predecessors = [
        sop.get("ReferencedSOPInstanceUID")
        for study in tags.get("PredecessorDocumentsSequence") or []
        for series in study.get("ReferencedSeriesSequence") or []
        for sop in series.get("ReferencedSOPSequence") or []
    ]
    return observers[0].get("VerifyingObserverName") == REVIEWER and predecessors == [ai_sr_uid]


async def test_a_radiograph_classified_routed_and_corrected_gives_a_verified_sr_in_the_nodes_inbox(
    stack: Stack, clients: Clients, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    async with clients.channel(f"127.0.0.1:{stack.gateway.port}", Role.INFERENCE) as channel:
        answer = await ipb_grpc.InferenceStub(channel).Classify(
            ipb.ClassifyRequest(image=ipb.ImageInput(data=source), output=ipb.OutputOptions(dicom_results=True)),
            timeout=120,
        )
    (ai_sr,) = [o for o in answer.dicom_results if o.kind == "SR"]
    (routing,) = answer.review
    assert routing.queued and routing.flow_definition == "verified-cls"
    case, loop = await review_one(clients, stack, "verified-cls", lambda c: pb.ReviewAnswer(label=other_label(c)))
    assert loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED
    corrected = other_label(case)
    path = await wait_for(lambda: sorted(stack.inbox.glob("*.dcm")), what="the verified SR in the node's inbox")
    (sr,) = [pydicom.dcmread(p) for p in path]
    src = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    assert (sr.VerificationFlag, sr.StudyInstanceUID) == ("VERIFIED", src.StudyInstanceUID)
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == REVIEWER
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == ai_sr.sop_instance_uid
    assert [m.lower() for m in classification_of(sr)] == [corrected]
    assert dciodvfy_errors(Path(str(sr.filename)).read_bytes(), tmp_path) == []
    state, _ = await asyncio.to_thread(stack.review.store.dicom_state, loop.name)
    assert state == HANDED_OVER
    # The verified SR copies the patient's header (correct DICOM); no log line of the whole path names them.
    assert str(sr.PatientName) == str(src.PatientName) and sr.PatientID == src.PatientID
    for value in (str(src.PatientName), str(src.PatientID), str(src.PatientBirthDate)):
        assert value not in caplog.text
    for p in path:  # the next test's node takes the inbox: leave it empty
        p.unlink()


async def test_a_ct_slice_sent_to_the_node_comes_back_into_orthanc_as_verified_srs(
    stack: Stack, clients: Clients, orthanc: Orthanc, shared_security: dict[str, Any], tmp_path: Path
) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        _unavailable("dcmtk's storescu is not on PATH (apt-get install dcmtk)")
    ds = pydicom.dcmread(pydicom_data_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    study = str(ds.StudyInstanceUID)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    settings = load_settings(
        dicom={
            "host": "127.0.0.1",
            "port": 0,
            "store_dir": tmp_path / "incoming",
            "outbox_dir": stack.node_outbox,
            "quarantine_dir": tmp_path / "quarantine",
            "routes_file": stack.root / "routes.toml",
            "quiet_period_s": 0.5,
            "destination": orthanc.destination,
            "retry_backoff_s": 0.2,
            "retry_backoff_max_s": 1.0,
            "gateway_url": f"127.0.0.1:{stack.gateway.port}",
            "min_free_disk_bytes": MIB,
        },
        security=shared_security,
    )
    node = DicomNode(settings)
    port = await asyncio.to_thread(node.start, port=0)
    try:
        command = [storescu, "-aet", "MODALITY", "-aec", "MEDGATE", "127.0.0.1", str(port), str(path)]
        sent = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=120)
        assert sent.returncode == 0, sent.stderr

        def ai_sr() -> dict[str, Any] | None:
            for instance in orthanc.find_instances(StudyInstanceUID=study):
                tags = orthanc.tags(instance["ID"])
                if tags.get("Modality") == "SR" and tags.get("VerificationFlag") == "UNVERIFIED":
                    return tags
            return None

        ai = await wait_for(ai_sr, what="the AI SR in Orthanc")
        _, loop = await review_one(clients, stack, "verified-cls", lambda c: pb.ReviewAnswer(label=other_label(c)))
        assert loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED

        moved: list[float] = []

        def move_box(case: pb.ReviewCase) -> pb.ReviewAnswer:
            if case.detections:  # drag the model's first box 40 model pixels sideways, staying in the image
                b = case.detections[0].model_box
                dx = 40.0 if b.x1 + 40 <= 1024 else -40.0
                box = [b.x0 + dx, b.y0, b.x1 + dx, b.y1]
            else:  # the model found nothing: the reviewer draws one
                box = [400.0, 420.0, 520.0, 560.0]
            moved.extend(box)
            drawn = ipb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])
            return pb.ReviewAnswer(boxes=pb.LabeledBoxes(boxes=[ipb.Detection(label="lesion", model_box=drawn)]))

        case, loop = await review_one(clients, stack, "verified-det", move_box)
        assert loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED

        def verified() -> list[dict[str, Any]] | None:
            found = []
            for instance in orthanc.find_instances(StudyInstanceUID=study):
                tags = orthanc.tags(instance["ID"])
                if tags.get("Modality") == "SR" and verifies(tags, ai["SOPInstanceUID"], study):
                    found.append(instance["ID"])
            return found if len(found) == 2 else None

        ids = await wait_for(verified, what="two verified SRs in Orthanc")
        objects = [await asyncio.to_thread(instance_file, orthanc, i) for i in ids]
        srs = [pydicom.dcmread(io.BytesIO(o)) for o in objects]
        (classified,) = [s for s in srs if classification_of(s)]
        (boxed,) = [s for s in srs if polylines(s)]
        assert classified.SeriesDescription == boxed.SeriesDescription == "medgate AI result verified by a reviewer"
        transform = json.loads(case.input_content_json)["transform"]
        letterbox = Letterbox.for_shape(int(transform["originalHeight"]), int(transform["originalWidth"]))
        expected = letterbox.boxes_to_original(np.array(moved))[0]
        (line,) = polylines(boxed)
        np.testing.assert_allclose(line[[0, 2]].ravel(), expected, atol=0.05)
        referenced = {
            str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in content_items(boxed)
            if "ReferencedSOPSequence" in i
        }
        assert str(ds.SOPInstanceUID) in referenced
        for data in objects:
            assert dciodvfy_errors(data, tmp_path) == []
        # Prometheus, as an operator watches the node: everything delivered to Orthanc, nothing left pending.
        from prometheus_client import REGISTRY

        label = {"destination": orthanc.destination}
        # Orthanc stores an object before our sender has read its C-STORE response and counted it: wait for the count.
        await wait_for(
            lambda: (REGISTRY.get_sample_value("medgate_dicom_sent_total", label) or 0) >= 3,  # the AI SR, two verified
            what="three sends counted",
        )
        await wait_for(
            lambda: REGISTRY.get_sample_value("medgate_dicom_outbox_pending", label) == 0, what="an empty outbox"
        )
    finally:
        await asyncio.to_thread(node.stop)
