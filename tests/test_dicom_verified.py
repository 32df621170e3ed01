"""Verified results as DICOM when a human loop completes: a real review service, real DICOM, no Triton.

Cases are started the way the gateway starts them (StartHumanLoopRequest with ``dicom``: the source's
bytes and the AI SR/SEG built by the real builders), answered with SubmitReview over gRPC, and the
review service's verified SR (and SEG) is looked for in the DICOM node's inbox. The path through the
real gateway, Triton, the node and Orthanc is tests/test_dicom_verified_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.dicom.results import (
    AIResults,
    Algorithm,
    Classification,
    Detection,
    Detections,
    Segment,
    build_dicom_results,
)
from services.gateway.convert import dicom_object_proto
from services.gateway.review_dicom import review_dicom_source
from services.imaging.arrays import encode_array
from services.imaging.limits import IngestLimits
from services.imaging.preprocess import Letterbox
from services.review.completion import HANDED_OVER, CompletionConfig
from services.review.server import ReviewServer
from services.settings import load_settings
from tests.fixtures import PATIENT_ID, PATIENT_NAME, dicom_bytes, phantom, pydicom_data_file
from tests.test_dicom_results import dciodvfy_errors

FLOWS = """
[[flows]]
name = "cls"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 60
activation_conditions = '{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}'

[[flows]]
name = "det"
task_type = "detection"
categories = ["lesion"]
task_count = 1
task_time_limit_s = 60
activation_conditions = '{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}'

[[flows]]
name = "seg"
task_type = "segmentation"
categories = ["left lung", "right lung", "heart"]
task_count = 1
task_time_limit_s = 60
activation_conditions = '{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}'
"""
CLASSIFIER = Algorithm("classifier", "1")
DETECTOR = Algorithm("detector", "1")
SEGMENTER = Algorithm("segmenter", "1")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Service:
    server: ReviewServer
    stub: pb_grpc.ReviewStub
    outbox: Path

    @property
    def inbox(self) -> Path:
        return self.outbox / "inbox"


@pytest.fixture
async def service(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    """A review service handing verified results to ``node-outbox``, retried every 0.3 s (or the indirect param)."""
    retry_s = float(getattr(request, "param", 0.3))
    flows = tmp_path / "flows.toml"
    flows.write_text(FLOWS)
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": flows, "port": 0, "web_enabled": False},
        security={"auth": False, "tls": False, "audit_dir": tmp_path / "audit"},
    )
    config = CompletionConfig(
        handover_dir=tmp_path / "node-outbox", limits=IngestLimits(), organization="Radiology", retry_interval_s=retry_s
    )
    server = ReviewServer(settings.review, settings.security, verified=config)
    await server.start(port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Service(server, pb_grpc.ReviewStub(channel), config.handover_dir)
    finally:
        await server.stop()


def verified_count(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("medgate_review_verified_dicom_total", {"outcome": outcome}) or 0.0


def radiograph() -> bytes:
    """A 2-D DX-like phantom radiograph (640x512) with patient data that must never reach a log."""
    image = (phantom(3).image.astype(np.uint16) * 16)[:512, :640]
    return dicom_bytes(np.ascontiguousarray(image))


def header(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def transform(letterbox: Letterbox) -> dict[str, Any]:
    return {
        "originalWidth": letterbox.original_width,
        "originalHeight": letterbox.original_height,
        "scale": letterbox.scale,
        "scaleX": letterbox.scale_x,
        "scaleY": letterbox.scale_y,
        "padLeft": letterbox.pad_left,
        "padTop": letterbox.pad_top,
        "modelSize": letterbox.size,
    }


def start_request(
    name: str, flow: str, source: bytes, ai: AIResults, content: dict[str, Any], models: dict[str, Algorithm]
) -> tuple[pb.StartHumanLoopRequest, list[ipb.DicomObject]]:
    """The case as the gateway's router sends it, with the AI objects built by the real builders."""
    objects = [dicom_object_proto(o) for o in build_dicom_results(source, frame=0, results=ai, limits=IngestLimits())]
    ds = header(source)
    dicom = review_dicom_source(
        source,
        frame=0,
        study_instance_uid=str(ds.StudyInstanceUID),
        objects=objects,
        models={task: ipb.ModelRef(name=a.name, version=a.version) for task, a in models.items()},
    )
    assert dicom is not None
    letterbox = Letterbox.for_shape(int(ds.Rows), int(ds.Columns))
    request = pb.StartHumanLoopRequest(
        name=name,
        flow_definition=flow,
        input_content_json=json.dumps({"inputHash": name, "transform": transform(letterbox), **content}),
        image_png=b"\x89PNG stand-in",
        dicom=dicom,
    )
    return request, objects


async def answer(stub: pb_grpc.ReviewStub, flow: str, reviewer: str, review: pb.ReviewAnswer) -> pb.HumanLoop:
    stream = stub.StreamCases(pb.StreamCasesRequest(reviewer_id=reviewer, flow_definitions=[flow]))
    case = await asyncio.wait_for(stream.read(), timeout=30)
    stream.cancel()
    assert b"DICM" not in case.SerializeToString(), "the source DICOM never goes to the reviewer"
    submitted = await stub.SubmitReview(
        pb.SubmitReviewRequest(
            decision_id=f"{case.human_loop_name}-1", delivery_id=case.delivery_id, reviewer_id=reviewer, answer=review
        )
    )
    return submitted.human_loop


async def handed_over(service: Service | Path, count: int, timeout_s: float = 30.0) -> list[Dataset]:
    """The objects in the node's inbox (of ``service``, or this folder) once there are ``count``."""
    inbox = service.inbox if isinstance(service, Service) else service
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = sorted(inbox.glob("*.dcm")) if inbox.exists() else []
        if len(files) >= count:
            return [pydicom.dcmread(f) for f in files]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no verified result in the node's inbox after {timeout_s:.0f} s")


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


def classification_of(sr: Dataset) -> list[str]:
    return [str(i.ConceptCodeSequence[0].CodeMeaning) for i in content_items(sr) if concept(i) == "Classification"]


def polylines(sr: Dataset) -> list[np.ndarray]:
    return [
        np.array(i.GraphicData, dtype=float).reshape(-1, 2) for i in content_items(sr) if i.get("ValueType") == "SCOORD"
    ]


def assert_verifies(sr: Dataset, source: bytes, ai_sr: ipb.DicomObject, reviewer: str) -> None:
    """VERIFIED, in the source's study, the reviewer as verifying observer, the AI SR as predecessor."""
    src = header(source)
    assert sr.Modality == "SR" and sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("VERIFIED", "COMPLETE")
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID not in (src.SeriesInstanceUID, ai_sr.series_instance_uid)
    (observer,) = sr.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == reviewer
    assert observer.VerifyingOrganization == "Radiology"
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert study.StudyInstanceUID == src.StudyInstanceUID
    assert (series.SeriesInstanceUID, instance.ReferencedSOPInstanceUID) == (
        ai_sr.series_instance_uid,
        ai_sr.sop_instance_uid,
    )


async def test_a_corrected_class_becomes_a_verified_sr_in_the_nodes_inbox(
    service: Service, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.62, CLASSIFIER))
    content = {
        "classification": {
            "scores": [{"label": "lesion", "score": 0.62}, {"label": "normal", "score": 0.38}],
            "model": {"name": "classifier", "version": "1"},
        }
    }
    request, objects = start_request("cls-1", "cls", source, ai, content, {"classify": CLASSIFIER})
    await service.stub.StartHumanLoop(request)
    started = time.perf_counter()
    loop = await answer(service.stub, "cls", "dr-lee", pb.ReviewAnswer(label="normal"))
    answered_ms = (time.perf_counter() - started) * 1000.0
    assert loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED
    (sr,) = await handed_over(service, 1)
    assert_verifies(sr, source, objects[-1], "dr-lee")
    assert [m.lower() for m in classification_of(sr)] == ["normal"]
    certainty = [i for i in content_items(sr) if concept(i) == "Certainty of Finding"]
    assert certainty == [], "a reviewer's class has no model score"
    assert dciodvfy_errors(Path(sr.filename).read_bytes(), tmp_path) == []
    state = await asyncio.to_thread(service.server.store.dicom_state, "cls-1")
    assert state == (HANDED_OVER, f"SR {sr.SOPInstanceUID}")
    described = await service.stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="cls-1"))
    assert (described.verified_dicom_state, described.verified_dicom_note) == state
    logged = caplog.text
    assert PATIENT_NAME.split("^")[0] not in logged and PATIENT_ID not in logged
    assert answered_ms < 5000  # the build runs after the answer, not inside it


async def test_an_accepted_detection_keeps_the_models_boxes_and_a_moved_box_is_mapped_to_source_pixels(
    service: Service, tmp_path: Path
) -> None:
    source = radiograph()
    letterbox = Letterbox.for_shape(512, 640)
    box = (100.0, 120.0, 220.0, 260.0)  # source pixels
    model_box = letterbox.boxes_to_model(np.array(box))[0]
    ai = AIResults(detections=Detections([Detection(box, "lesion", 0.41)], DETECTOR))
    detection = {
        "label": "lesion",
        "score": 0.41,
        "box": dict(zip(("x0", "y0", "x1", "y1"), box, strict=True)),
        "modelBox": dict(zip(("x0", "y0", "x1", "y1"), model_box.tolist(), strict=True)),
    }
    content = {"detection": {"detections": [detection], "model": {"name": "detector", "version": "1"}}}
    request, objects = start_request("det-1", "det", source, ai, content, {"detect": DETECTOR})
    await service.stub.StartHumanLoop(request)
    moved = model_box + np.array([32.0, 16.0, 32.0, 16.0])  # the reviewer drags the box (1024 model space)
    boxes = pb.ReviewAnswer(
        boxes=pb.LabeledBoxes(
            boxes=[ipb.Detection(label="lesion", model_box=ipb.Box(x0=moved[0], y0=moved[1], x1=moved[2], y1=moved[3]))]
        )
    )
    assert (await answer(service.stub, "det", "dr-lee", boxes)).status == pb.HUMAN_LOOP_STATUS_COMPLETED
    (sr,) = await handed_over(service, 1)
    assert_verifies(sr, source, objects[-1], "dr-lee")
    (line,) = polylines(sr)
    x0, y0, x1, y1 = letterbox.boxes_to_original(moved)[0]
    # The answer is rounded to 0.01 model pixels (A2I's boxes): about 0.01 source pixels here.
    np.testing.assert_allclose(line[[0, 2]], [[x0, y0], [x1, y1]], atol=0.05)
    assert abs(x0 - (box[0] + 32 / letterbox.scale_x)) < 0.05  # moved by 32 model pixels = 20 source pixels
    assert dciodvfy_errors(Path(sr.filename).read_bytes(), tmp_path) == []


async def test_a_corrected_mask_becomes_a_verified_seg_on_the_source_grid(service: Service, tmp_path: Path) -> None:
    source = radiograph()
    letterbox = Letterbox.for_shape(512, 640)
    model_masks = np.zeros((1, 1024, 1024), np.uint8)
    model_masks[0, 300:600, 200:500] = 1
    ai = AIResults(
        segments=[Segment("left lung", "lung", 0.55, SEGMENTER, prompt="left lung")],
        masks=letterbox.mask_to_original(model_masks),
    )
    content = {
        "segmentation": {"prompts": [{"prompt": "left lung", "category": "lung", "score": 0.55, "model": "segmenter"}]},
        "masksShape": [1, 1024, 1024],
    }
    request, objects = start_request("seg-1", "seg", source, ai, content, {"segment": SEGMENTER})
    request.masks_packbits = encode_array(model_masks, packbits=True).data
    await service.stub.StartHumanLoop(request)
    corrected = model_masks[0].copy()
    corrected[300:600, 200:300] = 0  # the reviewer erases part of the model's mask
    wire = encode_array(corrected, packbits=True)
    mask = ipb.NDArray(data=wire.data, shape=list(wire.shape), dtype=wire.dtype, encoding=ipb.ARRAY_ENCODING_PACKBITS)
    assert (await answer(service.stub, "seg", "dr-lee", pb.ReviewAnswer(mask=mask))).status == (
        pb.HUMAN_LOOP_STATUS_COMPLETED
    )
    found = await handed_over(service, 2)
    (seg,) = [d for d in found if d.Modality == "SEG"]
    (sr,) = [d for d in found if d.Modality == "SR"]
    assert_verifies(sr, source, objects[-1], "dr-lee")
    assert seg.StudyInstanceUID == header(source).StudyInstanceUID
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    np.testing.assert_array_equal(seg.pixel_array.astype(np.uint8), letterbox.mask_to_original(corrected))
    segment_refs = [
        i for i in content_items(sr) if i.get("ValueType") == "IMAGE" and concept(i) == "Referenced Segment"
    ]
    assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in segment_refs] == [seg.SOPInstanceUID]
    for obj in (seg, sr):
        assert dciodvfy_errors(Path(obj.filename).read_bytes(), tmp_path) == []


async def test_one_mask_per_prompt_marks_only_the_changed_ones_edited(service: Service, tmp_path: Path) -> None:
    source = radiograph()
    letterbox = Letterbox.for_shape(512, 640)
    model_masks = np.zeros((2, 1024, 1024), np.uint8)
    model_masks[0, 300:600, 200:500] = 1
    model_masks[1, 300:600, 560:860] = 1
    prompts = [("left lung", 0.55), ("right lung", 0.58)]
    ai = AIResults(
        segments=[Segment(p, "lung", score, SEGMENTER, prompt=p) for p, score in prompts],
        masks=letterbox.mask_to_original(model_masks),
    )
    content = {
        "segmentation": {
            "prompts": [{"prompt": p, "category": "lung", "score": score, "model": "segmenter"} for p, score in prompts]
        },
        "masksShape": [2, 1024, 1024],
    }
    request, objects = start_request("seg-2", "seg", source, ai, content, {"segment": SEGMENTER})
    ai_sr = objects[-1]
    request.masks_packbits = encode_array(model_masks, packbits=True).data
    await service.stub.StartHumanLoop(request)
    corrected = model_masks.copy()
    corrected[1, 300:400, 560:860] = 0  # only the right lung's mask is changed
    wire = encode_array(corrected, packbits=True)
    mask = ipb.NDArray(data=wire.data, shape=list(wire.shape), dtype=wire.dtype, encoding=ipb.ARRAY_ENCODING_PACKBITS)
    await answer(service.stub, "seg", "dr-lee", pb.ReviewAnswer(mask=mask))
    found = await handed_over(service, 2)
    (seg,) = [d for d in found if d.Modality == "SEG"]
    (sr,) = [d for d in found if d.Modality == "SR"]
    assert_verifies(sr, source, ai_sr, "dr-lee")
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["AUTOMATIC", "SEMIAUTOMATIC"]
    frames = seg.pixel_array.astype(np.uint8)
    np.testing.assert_array_equal(frames, letterbox.mask_to_original(corrected))
    assert dciodvfy_errors(Path(str(seg.filename)).read_bytes(), tmp_path) == []


async def test_a_node_folder_that_cannot_be_written_keeps_the_result_pending_and_it_is_sent_later(
    service: Service,
) -> None:
    """The decision is recorded and answered at once; the verified result waits in the store, not lost."""
    service.outbox.write_bytes(b"")  # a file where the node's folder should be: every hand-over fails
    waiting_before = verified_count("waiting")
    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.7, CLASSIFIER))
    content = {"classification": {"scores": [{"label": "lesion", "score": 0.7}], "model": {"name": "classifier"}}}
    request, objects = start_request("cls-2", "cls", source, ai, content, {"classify": CLASSIFIER})
    await service.stub.StartHumanLoop(request)
    loop = await answer(service.stub, "cls", "dr-lee", pb.ReviewAnswer(accept=True))
    assert loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED and loop.verified_dicom_state == "pending"
    for _ in range(200):  # at least two retry rounds (0.3 s apart; longer on a busy machine)
        if verified_count("waiting") >= waiting_before + 2:  # Prometheus: medgate_review_verified_dicom{outcome}
            break
        await asyncio.sleep(0.05)
    assert verified_count("waiting") >= waiting_before + 2
    assert await asyncio.to_thread(service.server.store.dicom_state, "cls-2") == ("pending", None)
    sent_before = verified_count("handed-over")
    service.outbox.unlink()  # the folder can be written again
    (sr,) = await handed_over(service, 1)
    assert_verifies(sr, source, objects[-1], "dr-lee")
    assert [m.lower() for m in classification_of(sr)] == ["lesion"]  # accepted: the model's class and score
    assert verified_count("handed-over") == sent_before + 1
    assert [i for i in content_items(sr) if concept(i) == "Certainty of Finding"]


def test_a_rebuild_after_a_crash_is_the_same_object_and_the_source_is_dropped_once_handed_over(tmp_path: Path) -> None:
    """Handed over but not marked (the service stopped between the two): the next round writes the same SOP
    instance, which the node sends once; once marked, the store no longer holds the source."""
    from services.dicom.node.handover import hand_over
    from services.review.completion import VerifiedDicom, dicom_attachments
    from services.review.flows import load_flows
    from services.review.store import DICOM_SOURCE_NAME, ReviewStore

    (tmp_path / "flows.toml").write_text(FLOWS)
    flows = load_flows(tmp_path / "flows.toml")
    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.7, CLASSIFIER))
    content = {"classification": {"scores": [{"label": "lesion", "score": 0.7}], "model": {"name": "classifier"}}}
    request, _ = start_request("cls-3", "cls", source, ai, content, {"classify": CLASSIFIER})
    config = CompletionConfig(handover_dir=tmp_path / "node-outbox", limits=IngestLimits())
    with ReviewStore(tmp_path / "review.sqlite3") as store:
        images = {"image.png": request.image_png, **dicom_attachments(request.dicom)}
        store.start_loop(flows["cls"], "cls-3", json.loads(request.input_content_json), "cls-3", images=images)
        (delivery,) = store.lease("dr-lee", ["cls"])
        store.submit("d-1", "dr-lee", {"label": "normal"}, delivery_id=delivery.delivery_id)
        (loop,) = store.pending_dicom()
        worker = VerifiedDicom(store, flows, config)
        first = worker.build(loop)
        assert first is not None
        hand_over(first, config.handover_dir)  # ... and the service stops before marking it
        assert worker.run_once().handed_over == 1
        files = sorted((config.handover_dir / "inbox").glob("*.dcm"))
        assert [f.name for f in files] == [f"{first[-1].sop_instance_uid}.dcm"]
        assert store.dicom_state("cls-3") == (HANDED_OVER, f"SR {first[-1].sop_instance_uid}")
        assert DICOM_SOURCE_NAME not in store.images("cls-3", with_dicom=True)
        assert list(store.images("cls-3")) == ["image.png"]


@pytest.mark.parametrize("service", [600.0], indirect=True)  # no retry round would come in time
async def test_a_decision_made_outside_submitreview_wakes_the_worker(service: Service) -> None:
    """The reviewer page and other replicas decide through the store: an ended lease wakes the worker at once."""
    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.7, CLASSIFIER))
    content = {"classification": {"scores": [{"label": "lesion", "score": 0.7}], "model": {"name": "classifier"}}}
    request, objects = start_request("cls-4", "cls", source, ai, content, {"classify": CLASSIFIER})
    await service.stub.StartHumanLoop(request)
    await asyncio.sleep(0.5)  # the worker's first round has run and now waits for the (long) retry interval
    store = service.server.store
    (delivery,) = await asyncio.to_thread(store.lease, "dr-web", ["cls"])
    await asyncio.to_thread(store.submit, "web-1", "dr-web", {"label": "normal"}, delivery_id=delivery.delivery_id)
    (sr,) = await handed_over(service, 1, timeout_s=10.0)
    assert_verifies(sr, source, objects[-1], "dr-web")


def test_the_case_keeps_the_source_only_when_the_answer_was_written_as_dicom() -> None:
    source = pydicom_data_file("CT_small.dcm").read_bytes()
    assert review_dicom_source(source, frame=0, study_instance_uid="1.2", objects=[], models={}) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_store_keeps_the_source_out_of_sight_and_pending_until_marked(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Both backends: pending from the start, listed once Completed, hidden from images() unless asked."""
    from services.review.flows import load_flows
    from services.review.store import DICOM_SOURCE_NAME, ReviewStore, ReviewStoreBase
    from services.review.store.postgres import PostgresReviewStore

    (tmp_path / "flows.toml").write_text(FLOWS)
    flow = load_flows(tmp_path / "flows.toml")["cls"]
    store: ReviewStoreBase
    if backend == "postgres":
        store = PostgresReviewStore(request.getfixturevalue("postgres_url"))
    else:
        store = ReviewStore(tmp_path / "review.sqlite3")
    with store:
        attached = {"image.png": b"png", DICOM_SOURCE_NAME: b"DICM source", "dicom.json": b"{}"}
        store.start_loop(flow, "with-dicom", {}, "h1", images=attached)
        store.start_loop(flow, "without", {}, "h2", images={"image.png": b"png"})
        assert store.dicom_state("with-dicom") == ("pending", None)
        assert store.dicom_state("without") == (None, None)
        assert list(store.images("with-dicom")) == ["image.png"]
        assert store.images("with-dicom", with_dicom=True) == attached
        assert store.pending_dicom() == []  # not Completed yet
        for reviewer in ("dr-a", "dr-b"):
            deliveries = store.lease(reviewer, ["cls"])
            for delivery in deliveries:
                store.submit(
                    f"{reviewer}-{delivery.loop.name}", reviewer, {"label": "normal"}, delivery_id=delivery.delivery_id
                )
        assert [loop.name for loop in store.pending_dicom()] == ["with-dicom"]
        store.mark_dicom("with-dicom", HANDED_OVER, "SR 1.2.3", drop_source=True)
        assert store.pending_dicom() == []
        assert store.dicom_state("with-dicom") == (HANDED_OVER, "SR 1.2.3")
        assert store.images("with-dicom", with_dicom=True) == {"image.png": b"png"}


async def test_a_rejected_case_gets_no_verified_result_and_one_that_cannot_be_built_is_marked_failed(
    service: Service,
) -> None:
    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.7, CLASSIFIER))
    content = {"classification": {"scores": [{"label": "lesion", "score": 0.7}], "model": {"name": "classifier"}}}
    rejected, _ = start_request("cls-5", "cls", source, ai, content, {"classify": CLASSIFIER})
    await service.stub.StartHumanLoop(rejected)
    await answer(service.stub, "cls", "dr-lee", pb.ReviewAnswer(reject_reason="wrong study"))
    broken, _ = start_request("cls-6", "cls", source, ai, content, {"classify": CLASSIFIER})
    broken.dicom.ClearField("ai_sr")  # no AI SR to verify: a gateway's bug, not something to retry forever
    await service.stub.StartHumanLoop(broken)
    await answer(service.stub, "cls", "dr-lee", pb.ReviewAnswer(label="normal"))
    store = service.server.store

    async def settled(name: str) -> tuple[str | None, str | None]:
        for _ in range(100):
            state = await asyncio.to_thread(store.dicom_state, name)
            if state[0] != "pending":
                return state
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name} is still pending")

    assert await settled("cls-5") == ("skipped", "nothing to verify: the case was rejected, or no mask was kept")
    assert await settled("cls-6") == ("failed", "the loop names no AI SR to verify")
    assert not service.inbox.exists() or not list(service.inbox.iterdir())


def test_with_several_reviewers_the_majority_class_and_its_first_reviewer_are_verified() -> None:
    from services.review.completion import chosen_decision
    from services.review.flows import TaskType
    from services.review.store import Decision, LoopStatus

    def decision(reviewer: str, answer: dict[str, Any], at: float) -> Decision:
        return Decision(f"d-{reviewer}", "loop", reviewer, None, answer, at - 5, at, LoopStatus.COMPLETED)

    votes = [
        decision("dr-a", {"label": "lesion"}, 1.0),
        decision("dr-b", {"rejected": True, "reason": "blurred"}, 2.0),
        decision("dr-c", {"label": "normal"}, 3.0),
        decision("dr-d", {"label": "normal"}, 4.0),
    ]
    chosen = chosen_decision(TaskType.CLASSIFICATION, votes)
    assert chosen is not None and chosen.reviewer_id == "dr-c"
    first = chosen_decision(TaskType.DETECTION, votes)
    assert first is not None and first.reviewer_id == "dr-a"
    assert chosen_decision(TaskType.DETECTION, [votes[1]]) is None


@pytest.mark.parametrize(("max_message_bytes", "keeps_source"), [(64 << 20, True), (3 << 20, False)])
async def test_routing_keeps_the_source_only_while_the_case_fits_one_message(
    service: Service, tmp_path: Path, max_message_bytes: int, keeps_source: bool
) -> None:
    """The real router (no Triton: the answer is written by hand) in front of the real review service."""
    from concurrent.futures import ThreadPoolExecutor

    from services.gateway.routing import ReviewRouter
    from services.imaging.prepare import prepare
    from services.review.flows import load_flows
    from services.review.outbox import Outbox

    ds = pydicom.dcmread(io.BytesIO(radiograph()))
    ds.private_block(0x0009, "medgate test", create=True).add_new(0x10, "OB", bytes(3 << 20))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    source = buffer.getvalue()  # 3.6 MB: more than a 3 MiB message holds beside the case's images
    prepared = prepare(source, limits=IngestLimits())
    classification = ipb.ClassifyResponse(
        scores=[ipb.ClassScore(label="lesion", score=0.6), ipb.ClassScore(label="normal", score=0.4)],
        model=ipb.ModelRef(name="classifier", version="1"),
        top_label="lesion",
        top_score=0.6,
    )
    ai = AIResults(classification=Classification("lesion", 0.6, CLASSIFIER))
    objects = [dicom_object_proto(o) for o in build_dicom_results(source, frame=0, results=ai, limits=IngestLimits())]
    flows = {"cls": load_flows(service.server.settings.flows_file)["cls"]}
    with ThreadPoolExecutor(2) as executor:
        router = ReviewRouter(
            flows,
            f"127.0.0.1:{service.server.port}",
            executor,
            timeout_s=10.0,
            outbox=Outbox(tmp_path / "gateway-outbox", max_bytes=1 << 30),
            max_message_bytes=max_message_bytes,
        )
        try:
            (routing,) = await router.route(
                image=ipb.ImageInput(data=source),
                prepared=prepared,
                classification=classification,
                dicom_results=objects,
            )
            assert routing.queued
            assert ("no verified result" in routing.reasons[-2]) is not keeps_source
            store = service.server.store
            for _ in range(200):  # delivered after the answer, by the background hand-off
                if store.queue_depth("cls"):
                    break
                await asyncio.sleep(0.05)
            expected = ("pending", None) if keeps_source else (None, None)
            assert await asyncio.to_thread(store.dicom_state, routing.human_loop_name) == expected
        finally:
            await router.close()


def test_where_verified_results_go(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Beside `medgate serve`'s node: its outbox; on its own: the configured folder, or none (with a warning)."""
    from services.review.completion import config_from

    node = {"outbox_dir": tmp_path / "node-outbox"}
    beside = config_from(load_settings(dicom=node), node_here=True)
    assert beside is not None and beside.handover_dir == tmp_path / "node-outbox"
    assert config_from(load_settings(dicom={**node, "enabled": False}), node_here=True) is None
    assert config_from(load_settings(dicom=node), node_here=False) is None  # `medgate review serve` alone
    assert "verified DICOM results wait in the review store" in caplog.text
    shared = load_settings(dicom=node, review={"verified_dicom_dir": str(tmp_path / "shared"), "organization": "X"})
    alone = config_from(shared, node_here=False)
    assert alone is not None and (alone.handover_dir, alone.organization) == (tmp_path / "shared", "X")
    off = load_settings(dicom=node, review={"verified_dicom": False})
    assert config_from(off, node_here=True) is None


def test_a_loop_that_cannot_be_mapped_is_marked_failed_and_does_not_hold_up_the_next(tmp_path: Path) -> None:
    from services.review.completion import FAILED, VerifiedDicom, dicom_attachments
    from services.review.flows import load_flows
    from services.review.store import ReviewStore

    (tmp_path / "flows.toml").write_text(FLOWS)
    flows = load_flows(tmp_path / "flows.toml")
    source = radiograph()
    ai = AIResults(detections=Detections([Detection((10.0, 10.0, 50.0, 50.0), "lesion", 0.3)], DETECTOR))
    good = {"detection": {"detections": [], "model": {"name": "detector", "version": "1"}}}
    config = CompletionConfig(handover_dir=tmp_path / "node-outbox", limits=IngestLimits())
    with ReviewStore(tmp_path / "review.sqlite3") as store:
        for name, content in (("det-bad", {"detection": ["not", "an", "object"]}), ("det-good", good)):
            request, _ = start_request(name, "det", source, ai, content, {"detect": DETECTOR})
            images = {"image.png": request.image_png, **dicom_attachments(request.dicom)}
            store.start_loop(flows["det"], name, json.loads(request.input_content_json), name, images=images)
            (delivery,) = store.lease("dr-lee", ["det"])
            store.submit(f"d-{name}", "dr-lee", {"accepted": True}, delivery_id=delivery.delivery_id)
        done = VerifiedDicom(store, flows, config).run_once()
        assert (done.failed, done.handed_over) == (1, 1)
        assert store.dicom_state("det-bad") == (FAILED, "the loop's values cannot be mapped (AttributeError)")
        assert store.dicom_state("det-good")[0] == HANDED_OVER


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG1_UNCI.dcm"])
def test_nothing_detected_is_stated_as_finding_absent(name: str, tmp_path: Path) -> None:
    """A detector that found nothing (or a reviewer who removed every box) still gets a conforming SR."""
    data = pydicom_data_file(name).read_bytes()
    results = AIResults(detections=Detections([], DETECTOR))
    (ai,) = build_dicom_results(data, frame=0, results=results, limits=IngestLimits())
    sr = pydicom.dcmread(io.BytesIO(ai.data))
    findings = [i for i in content_items(sr) if concept(i) == "Finding"]
    assert [str(i.ConceptCodeSequence[0].CodeMeaning) for i in findings] == ["Absent"]
    assert polylines(sr) == []
    assert dciodvfy_errors(ai.data, tmp_path) == []


def test_no_mask_kept_gives_no_verified_result(tmp_path: Path) -> None:
    """The reviewer page's per-prompt choice with every mask turned down: nothing to state as verified."""
    from services.review.completion import SKIPPED, VerifiedDicom, dicom_attachments
    from services.review.flows import load_flows
    from services.review.store import ReviewStore

    (tmp_path / "flows.toml").write_text(FLOWS)
    flows = load_flows(tmp_path / "flows.toml")
    letterbox = Letterbox.for_shape(512, 640)
    masks = np.zeros((1, 1024, 1024), np.uint8)
    masks[0, 300:600, 200:500] = 1
    segment = Segment("heart", "heart", 0.4, SEGMENTER, prompt="heart")
    ai = AIResults(segments=[segment], masks=letterbox.mask_to_original(masks))
    content = {
        "segmentation": {"prompts": [{"prompt": "heart", "category": "heart", "score": 0.4, "model": "segmenter"}]},
        "masksShape": [1, 1024, 1024],
    }
    request, _ = start_request("seg-x", "seg", radiograph(), ai, content, {"segment": SEGMENTER})
    images = {
        "image.png": request.image_png,
        "masks.packbits": encode_array(masks, packbits=True).data,
        **dicom_attachments(request.dicom),
    }
    config = CompletionConfig(handover_dir=tmp_path / "node-outbox", limits=IngestLimits())
    with ReviewStore(tmp_path / "review.sqlite3") as store:
        store.start_loop(flows["seg"], "seg-x", json.loads(request.input_content_json), "seg-x", images=images)
        (delivery,) = store.lease("dr-lee", ["seg"])
        answer = {
            "mask": {"data": "", "shape": [1024, 1024]},
            "maskDecisions": [{"prompt": "heart", "accepted": False}],
        }
        store.submit("d-x", "dr-lee", answer, delivery_id=delivery.delivery_id)
        assert VerifiedDicom(store, flows, config).run_once().skipped == 1
        assert store.dicom_state("seg-x")[0] == SKIPPED
        assert not (tmp_path / "node-outbox").exists()


async def test_a_result_pending_when_the_service_stops_is_handed_over_by_the_next_start(tmp_path: Path) -> None:
    flows = tmp_path / "flows.toml"
    flows.write_text(FLOWS)
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": flows, "port": 0, "web_enabled": False},
        security={"auth": False, "tls": False, "audit_dir": tmp_path / "audit"},
    )
    outbox = tmp_path / "node-outbox"
    config = CompletionConfig(
        handover_dir=outbox, limits=IngestLimits(), organization="Radiology", retry_interval_s=0.2
    )
    outbox.write_bytes(b"")  # the node's folder cannot be written while this service runs
    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.7, CLASSIFIER))
    content = {"classification": {"scores": [{"label": "lesion", "score": 0.7}], "model": {"name": "classifier"}}}
    request, objects = start_request("cls-r", "cls", source, ai, content, {"classify": CLASSIFIER})
    first = ReviewServer(settings.review, settings.security, verified=config)
    await first.start(port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = pb_grpc.ReviewStub(channel)
            await stub.StartHumanLoop(request)
            loop = await answer(stub, "cls", "dr-lee", pb.ReviewAnswer(label="normal"))
            assert loop.status == pb.HUMAN_LOOP_STATUS_COMPLETED
            await asyncio.sleep(0.5)
    finally:
        await first.stop()
    outbox.unlink()
    second = ReviewServer(settings.review, settings.security, verified=config)
    await second.start(port=0)
    try:
        (sr,) = await handed_over(outbox / "inbox", 1)
        assert_verifies(sr, source, objects[-1], "dr-lee")
        assert (await asyncio.to_thread(second.store.dicom_state, "cls-r"))[0] == HANDED_OVER
    finally:
        await second.stop()


async def test_a_loop_stopped_before_a_decision_drops_its_source(service: Service) -> None:
    from services.review.store import DICOM_SOURCE_NAME

    source = radiograph()
    ai = AIResults(classification=Classification("lesion", 0.7, CLASSIFIER))
    content = {"classification": {"scores": [{"label": "lesion", "score": 0.7}], "model": {"name": "classifier"}}}
    request, _ = start_request("cls-s", "cls", source, ai, content, {"classify": CLASSIFIER})
    await service.stub.StartHumanLoop(request)
    stopped = await service.stub.StopHumanLoop(pb.StopHumanLoopRequest(name="cls-s"))
    assert stopped.status == pb.HUMAN_LOOP_STATUS_STOPPED
    store = service.server.store
    for _ in range(100):
        loop = await service.stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="cls-s"))
        if loop.verified_dicom_state != "pending":
            break
        await asyncio.sleep(0.1)
    assert (loop.verified_dicom_state, loop.verified_dicom_note) == (
        "skipped",
        "the loop ended Stopped without a decision",
    )
    assert DICOM_SOURCE_NAME not in await asyncio.to_thread(store.images, "cls-s", with_dicom=True)
    assert not service.inbox.exists()
