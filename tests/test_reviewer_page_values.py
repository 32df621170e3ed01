"""What the reviewer page works on, without a browser: the gateway's 16-bit modality image of a DICOM case, and
a corrected segmentation recorded through the one submit path SubmitReview and the page share."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from services.gateway.review_image import modality_image
from services.gateway.routing import ReviewRouter, _with_image, outbox_request
from services.imaging.limits import IngestLimits
from services.imaging.prepare import PreparedImage, prepare
from services.review.convert import MASKS_NAME
from services.review.decide import Reviewer, submit_decision
from services.review.flows import FlowDefinition, InvalidArgument, TaskType, parse_conditions
from services.review.masks import read_labeled_image
from services.review.outbox import Outbox, unpack
from services.review.store import ReviewStore
from tests.conftest import free_port


def _prepared(name: str) -> PreparedImage:
    return prepare(Path(str(get_testdata_file(name))).read_bytes(), limits=IngestLimits())


@pytest.mark.parametrize(
    ("name", "modality", "window_source", "invert"),
    [
        ("CT_small.dcm", "CT", "auto", False),  # rescaled to HU, no window in the file
        ("MR_small.dcm", "MR", "dicom", False),
        ("RG1_UNCI.dcm", "CR", "dicom", True),  # MONOCHROME1: high values dark, as the model saw it
    ],
)
def test_the_modality_image_keeps_the_values_after_rescale_letterboxed_like_the_model_image(
    name: str, modality: str, window_source: str, invert: bool
) -> None:
    prepared = _prepared(name)
    image = modality_image(prepared)
    assert image is not None
    meta = image.meta
    stored = cv2.imdecode(np.frombuffer(image.png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16 and stored.shape == prepared.model_image.shape == (1024, 1024)
    values = meta["offset"] + stored.astype(np.float64) * meta["scale"]
    t = prepared.transform
    inside = (slice(t.pad_top, t.pad_top + t.resized_height), slice(t.pad_left, t.pad_left + t.resized_width))
    expected = t.apply(prepared.decoded.source.astype(np.float32))[inside]
    assert np.abs(values[inside] - expected).max() <= 0.5 * meta["scale"] + 1e-6  # 1 HU steps for CT
    assert meta["scale"] == 1.0  # integer data within 16 bits: exact
    assert (meta["modality"], meta["window"]["source"], meta["invert"]) == (modality, window_source, invert)
    if window_source == "dicom":
        assert meta["window"]["width"] == prepared.decoded.info.window.width
    padding = np.ones(stored.shape, bool)
    padding[inside] = False
    assert not stored[padding].any()
    if name == "CT_small.dcm":
        assert expected.min() < -500 and expected.max() > 1000  # air to bone in Hounsfield units


def test_a_png_input_has_no_modality_image_and_the_case_says_so() -> None:
    png = cv2.imencode(".png", np.full((64, 64), 100, np.uint8))[1].tobytes()
    assert modality_image(prepare(png, limits=IngestLimits())) is None


def test_the_routed_request_carries_the_16_bit_image_and_its_meta() -> None:
    prepared = _prepared("CT_small.dcm")
    image = modality_image(prepared)
    request = pb.StartHumanLoopRequest(name="x", input_content_json=json.dumps({"inputHash": "h"}))
    sent = _with_image(request, b"png", image)
    content = json.loads(sent.input_content_json)
    assert sent.modality_png == image.png and sent.image_png == b"png"  # type: ignore[union-attr]
    assert content["inputHash"] == "h" and content["modalityImage"]["modality"] == "CT"
    assert _with_image(request, b"png").modality_png == b""


SEGMENTATION = FlowDefinition(name="seg", task_type=TaskType.SEGMENTATION)


def test_a_corrected_mask_per_prompt_is_recorded_as_a2is_labeled_image(tmp_path: Path) -> None:
    masks = np.zeros((2, 1024, 1024), np.uint8)
    masks[0, 100:300, 100:300] = 1
    masks[1, 250:400, 250:400] = 1  # overlaps the first: the later prompt paints over it
    prompts = [{"prompt": "liver", "category": "liver"}, {"prompt": "tumor", "category": "tumor"}]
    content = {"segmentation": {"prompts": prompts}, "masksShape": [2, 1024, 1024]}
    with ReviewStore(tmp_path / "review.sqlite3") as store:
        store.start_loop(SEGMENTATION, "loop", content, "hash", images={MASKS_NAME: np.packbits(masks).tobytes()})
        (delivery,) = store.lease("dr-a", ["seg"])
        flows = {"seg": SEGMENTATION}
        wrong = ipb.NDArray(data=np.packbits(masks[:1]).tobytes(), shape=[1, 1024, 1024], dtype="uint8")
        wrong.shape[:] = [3, 1024, 1024]
        with pytest.raises(InvalidArgument):
            submit_decision(
                store,
                flows,
                Reviewer("dr-a"),
                delivery_id=delivery.delivery_id,
                decision_id="d1",
                answer=pb.ReviewAnswer(mask=wrong),
            )
        corrected = masks.copy()
        corrected[0, 100:150, 100:300] = 0
        answer = pb.ReviewAnswer(
            mask=ipb.NDArray(
                data=np.packbits(corrected).tobytes(),
                shape=[2, 1024, 1024],
                dtype="uint8",
                encoding=ipb.ARRAY_ENCODING_PACKBITS,
            )
        )
        loop, recorded = submit_decision(
            store, flows, Reviewer("dr-a"), delivery_id=delivery.delivery_id, decision_id="d1", answer=answer
        )
        assert recorded and loop.status == "Completed"
        (decision,) = store.decisions("loop")
    result = decision.answer["annotatedResult"]
    assert set(result["labelMappings"]) == {"liver", "tumor"}
    labeled = read_labeled_image(result)
    assert np.array_equal(labeled["tumor"], corrected[1].astype(bool))
    assert np.array_equal(labeled["liver"], corrected[0].astype(bool) & ~corrected[1].astype(bool))


async def test_a_case_kept_for_a_review_service_that_is_away_keeps_its_16_bit_image(tmp_path: Path) -> None:
    """The outbox first holds the request without its images, beside the caller's small DICOM file (the caller
    waits for neither PNG): the retries rebuild the 16-bit image from it. A delivery that fails for now replaces
    the entry with the complete request, so the retries send it as it is."""
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    prepared = prepare(data, limits=IngestLimits())
    flow = FlowDefinition(
        name="always",
        task_type=TaskType.CLASSIFICATION,
        categories=("normal", "lesion"),
        activation_conditions=parse_conditions(
            {"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}
        ),
    )
    outbox = Outbox(tmp_path / "outbox", max_bytes=64 << 20)
    router = ReviewRouter(
        {"always": flow}, f"127.0.0.1:{free_port()}", ThreadPoolExecutor(2), timeout_s=1.0, outbox=outbox
    )
    scores = ipb.ClassifyResponse(scores=[ipb.ClassScore(label="normal", score=0.6)])
    forms: list[str] = []
    try:
        (routing,) = await router.route(image=ipb.ImageInput(data=data), prepared=prepared, classification=scores)
        assert routing.queued
        deadline = time.monotonic() + 10
        while True:
            (entry,) = outbox.pending()
            payload = outbox.read(entry) or b""
            forms.append(unpack(payload).image)
            kept = outbox_request(payload)  # the request the retries would send
            assert kept.modality_png[:8] == b"\x89PNG\r\n\x1a\n", forms
            if forms[-1] == "" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await router.close()
    assert forms[-1] == "", forms  # complete after the failed delivery
    assert json.loads(kept.input_content_json)["modalityImage"]["modality"] == "CT"
