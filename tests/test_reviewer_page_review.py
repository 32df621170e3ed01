"""The reviewer page's case view in a real, headless Chromium: window/level on a CT's Hounsfield units, brush
and eraser corrections of a mask, an expired lease, and a skipped case taken by another reviewer.

The CT case is routed by the gateway's own router (``ReviewRouter.route`` on the decoded DICOM, over TLS
with the router token), so the 16-bit modality image is the gateway's. Screenshots go where
tests/test_reviewer_page.py puts its own; the case-view one is the README's (``docs/reviewer-page.png``
is copied from ``window-level-ct.png``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from medgate.v1.inference_pb2_grpc import InferenceStub
from services.gateway.routing import ReviewRouter
from services.gateway.server import GatewayServer
from services.imaging.limits import IngestLimits
from services.imaging.prepare import prepare
from services.review.flows import load_flows
from services.review.masks import read_labeled_image
from services.review.outbox import Outbox
from services.review.server import ReviewServer
from services.review.store import NotFound
from services.security.credentials import DevCredentials, load_signing_key, mint_token
from services.security.identity import Role
from services.settings import PROJECT_ROOT, load_settings
from tests.conftest import Clients, security_values
from tests.test_reviewer_page import _image, _output, _page, _shot, _sign_in_dev, _sign_in_token, browser

__all__ = ["browser"]  # the Chromium fixture, shared with tests/test_reviewer_page.py

LEASE_S = 3
SHORT_LEASE_FLOW = f"""
[[flows]]
name = "short-lease"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = {LEASE_S}
output_dir = "../var/review-output"
"""
# Every classification of the gateway in the end-to-end test goes to review (a 100% sample).
ALWAYS_FLOW = """
[[flows]]
name = "always-dicom"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 600
output_dir = "../var/review-output"
activation_conditions = '''
{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}
'''
"""


@pytest.fixture(scope="module")
async def review(dev_credentials: DevCredentials, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    root = tmp_path_factory.mktemp("reviewer-page-review")
    flows = root / "config" / "flows.toml"
    flows.parent.mkdir()
    flows.write_text((PROJECT_ROOT / "config" / "flows.toml").read_text() + SHORT_LEASE_FLOW + ALWAYS_FLOW)
    settings = load_settings(
        review={"store_path": root / "review.sqlite3", "flows_file": flows, "port": 0, "housekeeping_interval_s": 0.2},
        security=security_values(dev_credentials.directory, audit_dir=root / "audit"),
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    server.output_root = root / "var" / "review-output"  # type: ignore[attr-defined]
    server.root = root  # type: ignore[attr-defined]
    yield server
    await server.stop()


def _second_reviewer(dev_credentials: DevCredentials) -> str:
    settings = load_settings(security=security_values(dev_credentials.directory)).security
    return mint_token(
        load_signing_key(dev_credentials.signing_key),
        issuer=settings.issuer,
        audience=settings.audience,
        subject="second-reviewer",
        roles=[Role.REVIEWER.value],
    )


async def _start(clients: Clients, review: ReviewServer, request: pb.StartHumanLoopRequest) -> None:
    async with clients.channel(f"localhost:{review.port}", Role.ROUTER) as channel:
        await pb_grpc.ReviewStub(channel).StartHumanLoop(request, timeout=10)


async def _wait_loop(review: ReviewServer, name: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            review.store.describe(name)
            return
        except NotFound:
            assert time.monotonic() < deadline, f"{name} never reached the review service"
            await asyncio.sleep(0.05)


# --- window/level on the original values ----------------------------------------------------------


async def _route_ct(review: ReviewServer, dev_credentials: DevCredentials) -> str:
    """A CT slice with an unsure detection, routed as the gateway routes it (the real router, TLS, token)."""
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    prepared = prepare(data, limits=IngestLimits())
    box = ipb.Box(x0=300, y0=300, x1=600, y1=560)
    detection = ipb.DetectResponse(detections=[ipb.Detection(label="lesion", score=0.3, model_box=box, box=box)])
    settings = load_settings(security=security_values(dev_credentials.directory)).security
    root: Path = review.root  # type: ignore[attr-defined]
    flows = {name: f for name, f in load_flows(root / "config" / "flows.toml").items() if name == "lesion-detection"}
    router = ReviewRouter(
        flows,
        f"localhost:{review.port}",
        ThreadPoolExecutor(2),
        timeout_s=10,
        outbox=Outbox(root / f"outbox-{uuid.uuid4().hex[:6]}", max_bytes=64 << 20),
        security=settings,
    )
    try:
        image = ipb.ImageInput(data=data)
        (routing,) = await router.route(image=image, prepared=prepared, detection=detection)
        assert routing.queued, routing.reasons
        await _wait_loop(review, routing.human_loop_name)
    finally:
        await router.close()
    return routing.human_loop_name


def _hounsfield(review: ReviewServer, loop: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The case's modality values as the review store keeps them (16-bit PNG + offset/scale)."""
    png = review.store.images(loop)["modality.png"]
    meta = review.store.describe(loop).input_content["modalityImage"]
    stored = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16 and stored.shape == (1024, 1024)
    return meta["offset"] + stored.astype(np.float64) * meta["scale"], meta


def _expected(values: np.ndarray, width: float, level: float, invert: bool) -> np.ndarray:
    grey = np.clip(np.floor((values - (level - width / 2)) / width * 255 + 0.5), 0, 255)
    return 255 - grey if invert else grey


# Sample points inside the CT's content (the 128x128 slice fills the square).
SAMPLES = [(x, y) for x in range(100, 1000, 110) for y in range(80, 1000, 130)]


async def _rendered(page: Any) -> np.ndarray:
    values = await page.evaluate("(pts) => pts.map(([x, y]) => window.medgateReview.pixel(x, y))", SAMPLES)
    return np.array(values, np.float64)


async def test_window_level_presets_and_drag_work_on_hounsfield_units(
    review: ReviewServer, browser: Any, dev_credentials: DevCredentials
) -> None:
    page = await _page(browser, review)
    await _sign_in_dev(page)
    loop = await _route_ct(review, dev_credentials)
    await page.wait_for_selector("body[data-ready]", timeout=10000)
    assert await page.evaluate("window.medgateReview.state.kase.humanLoopName") == loop
    await page.wait_for_selector("#wl:has-text('CT 16-bit values')")
    hu, meta = _hounsfield(review, loop)
    # The 16-bit values go only to the reviewer holding the lease.
    url = await page.evaluate("window.medgateReview.state.kase.modality.url")
    other = await _page(browser, review)
    assert await other.evaluate("(u) => fetch(u).then((r) => r.status)", url) == 401
    await _sign_in_token(other, _second_reviewer(dev_credentials))
    await other.wait_for_selector("#work:not([hidden])")
    assert await other.evaluate("(u) => fetch(u).then((r) => r.status)", url) == 404
    await other.context.close()
    assert await page.evaluate("(u) => fetch(u).then((r) => r.status)", url) == 200
    assert meta["modality"] == "CT" and meta["scale"] == 1.0
    at = np.array([hu[y, x] for x, y in SAMPLES])
    assert at.max() - at.min() > 500, "the samples should span soft tissue to bone"

    seen = {}
    for key, (width, level) in {"1": (400, 40), "2": (1500, -600), "3": (1800, 400), "4": (80, 40)}.items():
        await page.keyboard.press(key)
        got = await _rendered(page)
        assert np.abs(got - _expected(at, width, level, meta["invert"])).max() <= 1, f"preset {key}"
        seen[key] = got
    assert not np.array_equal(seen["1"], seen["2"]) and not np.array_equal(seen["2"], seen["4"])
    await page.keyboard.press("1")
    await page.wait_for_selector("#wl:has-text('W 400 L 40 HU')")

    # Ctrl+drag: wider window (right) and lower level (down) on the original values.
    before = await page.evaluate("window.medgateReview.state.wl")
    box = await page.locator("#view").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    await page.keyboard.down("Control")
    await page.mouse.move(x, y)
    await page.mouse.down()
    await page.mouse.move(x + 120, y + 60, steps=6)
    await page.mouse.up()
    await page.keyboard.up("Control")
    after = await page.evaluate("window.medgateReview.state.wl")
    assert after["width"] > before["width"] + 100 and after["level"] < before["level"] - 50
    dragged = await _rendered(page)
    assert np.abs(dragged - _expected(at, after["width"], after["level"], meta["invert"])).max() <= 1
    assert not np.array_equal(dragged, seen["1"])

    await page.keyboard.press("i")
    inverted = await _rendered(page)
    assert np.array_equal(inverted, 255 - dragged)
    await page.keyboard.press("i")
    await page.keyboard.press("1")
    shot = await _shot(page, "window-level-ct")
    await page.keyboard.press("Enter")  # the model's box as it is
    await page.wait_for_selector("#status:has-text('Submitted')")
    (answer,) = _output(review, loop)["humanAnswers"]
    assert answer["answerContent"]["initialValueModified"] is False
    assert shot.stat().st_size > 10_000
    await page.context.close()


async def test_a_dicom_classified_by_the_gateway_reaches_the_page_with_its_hounsfield_units(
    review: ReviewServer,
    browser: Any,
    clients: Clients,
    triton_url: str,
    dev_credentials: DevCredentials,
    tmp_path: Path,
) -> None:
    """End to end: Classify over gRPC (real Triton), routed by the gateway, windowed on the page with Shift+1-4
    (digits choose categories in classification), answered with one key."""
    flows = tmp_path / "config" / "flows.toml"
    flows.parent.mkdir()
    flows.write_text(ALWAYS_FLOW)
    settings = load_settings(
        gateway={"port": 0, "metrics_port": -1},
        security=security_values(dev_credentials.directory, audit_dir=tmp_path / "audit"),
        review={
            "url": f"127.0.0.1:{review.port}",
            "flows_file": flows,
            "outbox_dir": tmp_path / "outbox",
            "route_timeout_s": 5.0,
        },
    )
    page = await _page(browser, review)
    await _sign_in_dev(page)
    gateway = GatewayServer(settings, triton_url)
    await gateway.start(port=0)
    try:
        async with clients.channel(f"127.0.0.1:{gateway.port}", Role.INFERENCE) as channel:
            data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
            answer = await InferenceStub(channel).Classify(ipb.ClassifyRequest(image=ipb.ImageInput(data=data)))
    finally:
        await gateway.stop()
    (routing,) = answer.review
    assert routing.queued and routing.flow_definition == "always-dicom"
    await page.wait_for_selector("body[data-ready]", timeout=15000)
    assert await page.evaluate("window.medgateReview.state.kase.humanLoopName") == routing.human_loop_name
    await page.wait_for_selector("#wl:has-text('CT 16-bit values')")
    hu, meta = _hounsfield(review, routing.human_loop_name)
    at = np.array([hu[y, x] for x, y in SAMPLES])
    for key, (width, level) in {"Shift+1": (400, 40), "Shift+2": (1500, -600), "Shift+4": (80, 40)}.items():
        await page.keyboard.press(key)
        got = await _rendered(page)
        assert np.abs(got - _expected(at, width, level, meta["invert"])).max() <= 1, key
    await _shot(page, "gateway-dicom-classification")
    await page.keyboard.press("2")  # lesion
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#status:has-text('Submitted')")
    (human,) = _output(review, routing.human_loop_name)["humanAnswers"]
    assert human["answerContent"]["label"] == "lesion"
    await page.context.close()


# --- segmentation: brush and eraser ---------------------------------------------------------------


def _masks() -> np.ndarray:
    y, x = np.mgrid[0:1024, 0:1024]
    masks = np.zeros((2, 1024, 1024), np.uint8)
    masks[0] = (x - 300) ** 2 + (y - 300) ** 2 <= 120**2
    masks[1, 600:801, 600:801] = 1
    return masks


async def _drag(page: Any, points: list[tuple[float, float]]) -> None:
    first = await page.evaluate("([x, y]) => window.medgateReview.toPage(x, y)", list(points[0]))
    await page.mouse.move(*first)
    await page.mouse.down()
    for point in points[1:]:
        await page.mouse.move(
            *(await page.evaluate("([x, y]) => window.medgateReview.toPage(x, y)", list(point))), steps=8
        )
    await page.mouse.up()


async def test_brush_and_eraser_correct_a_mask_and_the_labeled_image_records_it(
    review: ReviewServer, browser: Any, clients: Clients
) -> None:
    masks = _masks()
    name = f"seg-{uuid.uuid4().hex[:12]}"
    prompts = [
        {"prompt": "lesion", "category": "tumor", "score": 0.4},
        {"prompt": "heart", "category": "heart anatomies", "score": 0.5},
    ]
    content = {"segmentation": {"prompts": prompts}, "masksShape": list(masks.shape)}
    request = pb.StartHumanLoopRequest(
        name=name,
        flow_definition="segmentation-review",
        input_content_json=json.dumps(content),
        image_png=_image(),
        masks_packbits=np.packbits(masks).tobytes(),
    )
    page = await _page(browser, review)
    await _sign_in_dev(page)
    await _start(clients, review, request)
    await page.wait_for_selector("body[data-ready]", timeout=10000)
    await page.wait_for_selector("#wl:has-text('8-bit image')")  # a PNG input: no 16-bit values
    await page.keyboard.press("Tab")  # the first mask (lesion)
    await page.keyboard.press("b")
    await page.wait_for_selector("#tool:has-text('Brush 12 px on lesion')")
    await page.keyboard.press("]")
    await page.keyboard.press("]")  # 12 -> 15 -> 19 px
    await _drag(page, [(500, 200), (560, 200), (560, 260)])  # outside the circle: added
    await page.keyboard.press("e")
    await page.wait_for_selector("#tool:has-text('Eraser 19 px on lesion')")
    await _drag(page, [(300, 250), (300, 350)])  # through the circle: removed
    await page.keyboard.press("Escape")
    await page.reload()  # the unfinished correction survives a reload (its strokes are replayed)
    await page.wait_for_selector("body[data-ready]", timeout=10000)
    await page.wait_for_selector("#status:has-text('restored')")
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")  # the second mask (heart)
    await page.keyboard.press("x")  # rejected
    await _shot(page, "segmentation-brush")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#status:has-text('Submitted')")

    (answer,) = _output(review, name)["humanAnswers"]
    result = answer["answerContent"]
    assert result["initialValueModified"] is True
    assert [(d["prompt"], d["accepted"], d["corrected"]) for d in result["maskDecisions"]] == [
        ("lesion", True, True),
        ("heart", False, False),
    ]
    labeled = read_labeled_image(result["annotatedResult"])
    lesion, heart = labeled["lesion"], labeled["heart"]
    assert result["annotatedResult"]["inputImageProperties"] == {"width": 1024, "height": 1024}
    assert not heart.any(), "a rejected mask paints nothing"
    assert lesion[200, 530] and lesion[230, 560] and not masks[0][200, 530], "the brush stroke is in the mask"
    assert not lesion[300, 300] and masks[0][300, 300], "the eraser stroke is out of it"
    changed = lesion != masks[0].astype(bool)
    ys, xs = np.nonzero(changed)
    assert 150 < changed.sum() < 20_000 and xs.min() >= 270 and ys.max() <= 380, "only where painted"
    assert lesion[300, 200] and lesion[400, 300], "the rest of the model's mask is kept"
    await page.context.close()


# --- leases: expiry and skipping ------------------------------------------------------------------


def _classification_case(flow: str) -> pb.StartHumanLoopRequest:
    content = {"classification": {"scores": [{"label": "normal", "score": 0.55}, {"label": "lesion", "score": 0.45}]}}
    return pb.StartHumanLoopRequest(
        name=f"lease-{uuid.uuid4().hex[:12]}",
        flow_definition=flow,
        input_content_json=json.dumps(content),
        image_png=_image(),
    )


async def test_an_expired_lease_is_reported_and_the_case_goes_to_another_reviewer(
    review: ReviewServer, browser: Any, clients: Clients, dev_credentials: DevCredentials
) -> None:
    one = await _page(browser, review)
    await _sign_in_dev(one)
    request = _classification_case("short-lease")
    await _start(clients, review, request)
    await one.wait_for_selector("body[data-ready]", timeout=10000)
    first = await one.evaluate("window.medgateReview.state.kase.deliveryId")
    two = await _page(browser, review)  # waiting when the lease lapses
    await _sign_in_token(two, _second_reviewer(dev_credentials))
    await two.wait_for_selector("#work:not([hidden])")
    await one.wait_for_selector("#lease.expired", timeout=(LEASE_S + 3) * 1000)
    await one.wait_for_selector("#status:has-text('expired before you submitted')")
    await one.keyboard.press("Enter")  # refused on the page: the case is someone else's now
    await one.wait_for_selector("#status:has-text('expired')")
    await _shot(one, "lease-expired")
    await two.wait_for_selector("body[data-ready]", timeout=5000)
    assert await two.evaluate("window.medgateReview.state.kase.humanLoopName") == request.name
    assert await two.evaluate("window.medgateReview.state.kase.deliveryId") != first
    await _shot(two, "lease-expired-taken-over")
    assert review.store.decisions(request.name) == []
    await one.keyboard.press("s")  # the first reviewer takes cases again; this one is the other's now
    await one.wait_for_selector("#status:has-text('Taking cases again')")
    assert await one.is_visible("#waiting")
    await two.keyboard.press("2")
    await two.keyboard.press("Enter")
    await two.wait_for_selector("#status:has-text('Submitted')")
    (answer,) = _output(review, request.name)["humanAnswers"]
    assert answer["workerMetadata"]["identityData"]["sub"] == "second-reviewer"
    for page in (one, two):
        await page.context.close()


async def test_a_skipped_case_goes_back_to_the_queue_and_another_reviewer_takes_it(
    review: ReviewServer, browser: Any, clients: Clients, dev_credentials: DevCredentials
) -> None:
    one = await _page(browser, review)
    await _sign_in_dev(one)
    request = _classification_case("chest-xray-classification")
    await _start(clients, review, request)
    await one.wait_for_selector("body[data-ready]", timeout=10000)
    two = await _page(browser, review)
    await _sign_in_token(two, _second_reviewer(dev_credentials))
    await two.wait_for_selector("#work:not([hidden])")
    await one.keyboard.press("s")
    await one.wait_for_selector("#status:has-text('Skipped')")
    await two.wait_for_selector("body[data-ready]", timeout=5000)
    assert await two.evaluate("window.medgateReview.state.kase.humanLoopName") == request.name
    await _shot(two, "skipped-taken-over")
    await asyncio.sleep(0.5)
    assert await one.is_visible("#waiting"), "the reviewer who skipped it does not get it back"
    await two.keyboard.press("1")
    await two.keyboard.press("Enter")
    await two.wait_for_selector("#status:has-text('Submitted')")
    for page in (one, two):
        await page.context.close()
