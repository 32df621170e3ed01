"""The reviewer web page in a real, headless Chromium (Debian's, through Playwright) against a real review service.

Cases are started as the gateway routes them (StartHumanLoop with the router's token over TLS). Each test
saves a screenshot under tmp/artifacts/reviewer-page/ (TEST_ARTIFACTS_DIR moves it). Without chromium
the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.security.credentials import DevCredentials, load_signing_key, mint_token
from services.security.identity import Role
from services.settings import PROJECT_ROOT, load_settings
from tests.conftest import Clients, security_values

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", PROJECT_ROOT / "tmp" / "artifacts")) / "reviewer-page"


def _chromium_or_skip() -> None:
    if Path(CHROMIUM).exists() and shutil.which(CHROMIUM):
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {message}: the reviewer page's browser tests must run in CI")
    pytest.skip(message)


@pytest.fixture(scope="module")
async def review(dev_credentials: DevCredentials, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    root = tmp_path_factory.mktemp("reviewer-page")
    flows = root / "config" / "flows.toml"
    flows.parent.mkdir()
    flows.write_text((PROJECT_ROOT / "config" / "flows.toml").read_text())
    settings = load_settings(
        review={"store_path": root / "review.sqlite3", "flows_file": flows, "port": 0, "housekeeping_interval_s": 0.2},
        security=security_values(dev_credentials.directory, audit_dir=root / "audit"),
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    server.output_root = root / "var" / "review-output"  # type: ignore[attr-defined]
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    _chromium_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        await chromium.close()


async def _page(browser: Any, review: ReviewServer) -> Any:
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"https://localhost:{review.web_port}/")
    return page


async def _sign_in_dev(page: Any) -> None:
    await page.click("#dev-signin")
    await page.wait_for_selector("#work:not([hidden])")


async def _sign_in_token(page: Any, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#token-signin")


async def _shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path))
    return path


def _image() -> bytes:
    y, x = np.mgrid[0:1024, 0:1024]
    image = ((x + y) / 8 % 256).astype(np.uint8)
    cv2.circle(image, (300, 300), 80, (230,), -1)
    return cv2.imencode(".png", image)[1].tobytes()


async def _route(clients: Clients, review: ReviewServer, flow: str, content: dict[str, Any]) -> str:
    """Start a human loop as the gateway does when it routes an unsure answer (the router's token)."""
    name = f"page-{uuid.uuid4().hex[:12]}"
    async with clients.channel(f"localhost:{review.port}", Role.ROUTER) as channel:
        stub = pb_grpc.ReviewStub(channel)
        request = pb.StartHumanLoopRequest(
            name=name, flow_definition=flow, input_content_json=json.dumps(content), image_png=_image()
        )
        await stub.StartHumanLoop(request, timeout=10)
    return name


def _output(review: ReviewServer, loop: str) -> dict[str, Any]:
    root: Path = review.output_root  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = list(root.rglob(f"{loop}/output.json"))
        if found:
            return json.loads(found[0].read_text())
        time.sleep(0.05)
    raise AssertionError(f"no output.json for {loop} under {root}")


CLASSIFICATION = {
    "classification": {"scores": [{"label": "normal", "score": 0.55}, {"label": "lesion", "score": 0.45}]}
}


async def test_routed_case_appears_live_and_one_key_classifies(
    review: ReviewServer, browser: Any, clients: Clients
) -> None:
    page = await _page(browser, review)
    await _sign_in_dev(page)
    await page.wait_for_selector("#queue li")  # no string evaluation: the page's CSP forbids eval
    started = time.monotonic()
    loop = await _route(clients, review, "chest-xray-classification", CLASSIFICATION)
    await page.wait_for_selector("body[data-ready]", timeout=5000)
    assert time.monotonic() - started < 1.0, "the routed case took over a second to appear"
    await page.keyboard.press("2")  # lesion: the model said normal
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#status:has-text('Submitted')")
    await _shot(page, "classification-submitted")
    document = _output(review, loop)
    (answer,) = document["humanAnswers"]
    assert answer["answerContent"]["label"] == "lesion"
    assert answer["answerContent"]["initialValueModified"] is True
    assert answer["workerId"] == "dev-reviewer" or answer["workerMetadata"]["identityData"]["sub"]
    assert {"acceptanceTime", "submissionTime", "timeSpentInSeconds"} <= answer.keys()
    await page.context.close()


async def test_dragged_box_corner_survives_reload_and_is_submitted_modified(
    review: ReviewServer, browser: Any, clients: Clients
) -> None:
    page = await _page(browser, review)
    await _sign_in_dev(page)
    detection = {"label": "lesion", "score": 0.4, "modelBox": {"x0": 200, "y0": 200, "x1": 400, "y1": 400}}
    loop = await _route(clients, review, "lesion-detection", {"detection": {"detections": [detection]}})
    await page.wait_for_selector("body[data-ready]", timeout=5000)
    x, y = await page.evaluate("window.medgateReview.toPage(400, 400)")
    await page.mouse.move(x, y)
    await page.mouse.down()
    await page.mouse.move(x + 30, y + 40, steps=5)
    await page.mouse.up()
    await page.reload()  # unfinished work survives a reload
    await page.wait_for_selector("body[data-ready]", timeout=5000)
    await page.wait_for_selector("#status:has-text('restored')")
    await _shot(page, "detection-restored")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#status:has-text('Submitted')")
    (answer,) = _output(review, loop)["humanAnswers"]
    (box,) = answer["answerContent"]["annotatedResult"]["boundingBoxes"]
    assert answer["answerContent"]["initialValueModified"] is True
    assert (box["left"], box["top"]) == (200, 200)
    assert box["width"] > 210 and box["height"] > 210
    await page.context.close()


async def test_two_reviewers_never_get_the_same_case(
    review: ReviewServer, browser: Any, clients: Clients, dev_credentials: DevCredentials
) -> None:
    settings = load_settings(security=security_values(dev_credentials.directory)).security
    second = mint_token(
        load_signing_key(dev_credentials.signing_key),
        issuer=settings.issuer,
        audience=settings.audience,
        subject="second-reviewer",
        roles=[Role.REVIEWER.value],
    )
    one, two = await _page(browser, review), await _page(browser, review)
    await _sign_in_dev(one)
    await _sign_in_token(two, second)
    await two.wait_for_selector("#work:not([hidden])")
    loops = {await _route(clients, review, "chest-xray-classification", CLASSIFICATION) for _ in range(2)}
    await one.wait_for_selector("body[data-ready]", timeout=5000)
    await two.wait_for_selector("body[data-ready]", timeout=5000)
    first = await one.evaluate("window.medgateReview.state.kase.humanLoopName")
    other = await two.evaluate("window.medgateReview.state.kase.humanLoopName")
    assert first != other and {first, other} == loops
    await _shot(one, "two-reviewers-one")
    await _shot(two, "two-reviewers-two")
    # Skipping gives the case back; the other reviewer is busy, so it waits in the queue.
    await one.keyboard.press("s")
    await one.wait_for_selector("#status:has-text('Skipped')")
    for page in (one, two):
        await page.context.close()


async def test_a_user_without_the_reviewer_role_is_refused(review: ReviewServer, browser: Any) -> None:
    page = await _page(browser, review)
    await _sign_in_token(page, (review.security.credentials_dir / "inference.token").read_text())  # type: ignore[union-attr]
    await page.wait_for_selector("#signin-error:has-text('no reviewer role')")
    assert await page.is_hidden("#work")
    await _shot(page, "refused")
    answer = await page.evaluate(
        "fetch('/api/cases/x/submit', {method: 'POST', headers: {'x-medgate-csrf': 'x'}}).then(r => r.status)"
    )
    assert answer == 401
    await page.context.close()
