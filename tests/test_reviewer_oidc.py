"""Signing in to the reviewer page through an identity provider, in a real headless Chromium (Debian's).

The provider is tests/oidc_provider.py, a small real OIDC provider on a free port; the review service trusts
it as ``security.oidc_issuer`` for gRPC and the page is its client (``review.web_oidc_*``). The browser goes
through the whole redirect flow (authorization code with PKCE S256). Each test saves a screenshot under
tmp/artifacts/reviewer-oidc/ (TEST_ARTIFACTS_DIR moves it). Without chromium the tests skip, except under
CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clients import connect
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.review.web.oidc import pkce_challenge, pkce_verifier
from services.security.credentials import DevCredentials
from services.settings import PROJECT_ROOT, load_settings
from tests.conftest import security_values
from tests.oidc_provider import OidcProvider, TestClient, TestUser
from tests.test_reviewer_page import _output, browser

__all__ = ["browser"]  # the Chromium fixture, shared with tests/test_reviewer_page.py

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", PROJECT_ROOT / "tmp" / "artifacts")) / "reviewer-oidc"
CLIENT_ID, CLIENT_SECRET = "medgate-review", "page-secret"
SESSION_COOKIE, SIGN_IN_COOKIE = "__Host-medgate-review", "__Host-medgate-signin"


@pytest.fixture(scope="module")
async def idp() -> AsyncIterator[OidcProvider]:
    provider = OidcProvider()
    await provider.start()
    provider.register(TestClient(CLIENT_ID, secret=CLIENT_SECRET))
    yield provider
    await provider.stop()


@pytest.fixture(autouse=True)
def reviewer(idp: OidcProvider) -> Iterator[TestUser]:
    """The user the provider signs in: a reviewer unless a test says otherwise."""
    idp.user = TestUser()
    yield idp.user
    idp.user = TestUser()


async def _review_server(root: Path, credentials: DevCredentials, idp: OidcProvider, **web: Any) -> ReviewServer:
    root.mkdir(parents=True, exist_ok=True)
    flows = root / "config" / "flows.toml"  # its output_dir is ../var/review-output
    flows.parent.mkdir()
    flows.write_text((PROJECT_ROOT / "config" / "flows.toml").read_text())
    secret = root / "client.secret"
    secret.write_text(CLIENT_SECRET + "\n")
    settings = load_settings(
        review={
            "store_path": root / "review.sqlite3",
            "flows_file": flows,
            "port": 0,
            "housekeeping_interval_s": 0.2,
            "web_oidc_client_id": CLIENT_ID,
            "web_oidc_client_secret_file": str(secret),
            **web,
        },
        security=security_values(
            credentials.directory, audit_dir=root / "audit", oidc_issuer=idp.issuer, jwks_min_refetch_s=0.0
        ),
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    base = f"https://localhost:{server.web_port}"
    client = idp.clients[CLIENT_ID]
    client.redirect_uris.add(f"{base}/auth/callback")
    client.post_logout_redirect_uris.add(f"{base}/")
    server.output_root = root / "var" / "review-output"  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="module")
async def review(
    dev_credentials: DevCredentials, idp: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ReviewServer]:
    server = await _review_server(tmp_path_factory.mktemp("reviewer-oidc"), dev_credentials, idp)
    yield server
    await server.stop()


def _base(review: ReviewServer) -> str:
    return f"https://localhost:{review.web_port}"


async def _page(browser: Any, review: ReviewServer) -> Any:
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{_base(review)}/")
    await page.wait_for_selector("#oidc-signin")
    return page


async def _sign_in(page: Any) -> None:
    await page.click("#oidc-signin")
    await page.wait_for_selector("#work:not([hidden])")
    await page.wait_for_selector("#queue li")


async def _shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path))
    return path


async def _status(page: Any, path: str) -> int:
    return int(await page.evaluate(f"fetch({json.dumps(path)}).then(r => r.status)"))


async def _route_case(review: ReviewServer, idp: OidcProvider, credentials: DevCredentials) -> str:
    """A case started as the gateway routes one, over gRPC with a router token from the same provider."""
    name = f"oidc-{uuid.uuid4().hex[:12]}"
    token = idp.access_token(TestUser(subject="gateway", roles=["router"], name="gateway"))
    security = connect.ClientSecurity(ca_file=credentials.ca_cert, token=token)
    image = cv2.imencode(".png", np.full((1024, 1024), 90, np.uint8))[1].tobytes()
    content = {"classification": {"scores": [{"label": "normal", "score": 0.55}, {"label": "lesion", "score": 0.45}]}}
    async with connect.aio_channel(f"localhost:{review.port}", security) as channel:
        request = pb.StartHumanLoopRequest(
            name=name,
            flow_definition="chest-xray-classification",
            input_content_json=json.dumps(content),
            image_png=image,
        )
        await pb_grpc.ReviewStub(channel).StartHumanLoop(request, timeout=10)
    return name


async def test_sign_in_through_the_identity_provider_then_review_a_case(
    review: ReviewServer, idp: OidcProvider, browser: Any, dev_credentials: DevCredentials
) -> None:
    page = await _page(browser, review)
    assert await page.is_hidden("#dev-block") and await page.is_hidden("#token-block")
    pasted = await page.evaluate(  # with the IdP's sign-in configured, a pasted token is not a way in
        "fetch('/api/session/token', {method: 'POST', headers: {'x-medgate-csrf': 'signin', 'content-type':"
        " 'application/json'}, body: JSON.stringify({token: 'x'})}).then(r => r.status)"
    )
    assert pasted == 404
    exchanged = len(idp.exchanges)
    await _sign_in(page)
    assert page.url == f"{_base(review)}/"
    assert "dr.oidc" in (await page.text_content("#who") or "")
    assert idp.exchanges[exchanged:] == [{"client_id": CLIENT_ID, "auth": "client_secret_basic"}]
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert SIGN_IN_COOKIE not in cookies  # the sign-in's state cookie is spent
    session = cookies[SESSION_COOKIE]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    loop = await _route_case(review, idp, dev_credentials)
    await page.wait_for_selector("body[data-ready]", timeout=5000)
    await _shot(page, "signed-in-case")
    await page.keyboard.press("2")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#status:has-text('Submitted')")
    (answer,) = _output(review, loop)["humanAnswers"]
    assert answer["workerMetadata"]["identityData"] | {"identityProviderType": None} == {
        "identityProviderType": None,
        "issuer": idp.issuer,
        "sub": "dr-oidc",
    }
    await page.context.close()


async def test_a_user_without_the_reviewer_role_gets_a_403_page(
    review: ReviewServer, browser: Any, reviewer: TestUser
) -> None:
    reviewer.subject, reviewer.name, reviewer.roles = "clerk-1", "clerk", ["inference"]
    page = await _page(browser, review)
    async with page.expect_response(lambda r: "/auth/callback" in r.url) as callback:
        await page.click("#oidc-signin")
    assert (await callback.value).status == 403
    await page.wait_for_selector("#signin-problem:has-text('no reviewer role')")
    assert "clerk" in (await page.text_content("#signin-problem") or "")
    await _shot(page, "no-reviewer-role")
    assert await _status(page, "/api/events") == 401  # no session was made
    await page.context.close()


async def test_a_wrong_code_verifier_is_refused_by_the_provider(
    review: ReviewServer, idp: OidcProvider, browser: Any
) -> None:
    page = await _page(browser, review)

    async def swap_challenge(route: Any) -> None:
        """The page's redirect to the IdP with another challenge: the page's verifier no longer matches the code."""
        response = await route.fetch(max_redirects=0)
        parts = urllib.parse.urlsplit(response.headers["location"])
        query = dict(urllib.parse.parse_qsl(parts.query)) | {"code_challenge": pkce_challenge(pkce_verifier())}
        location = parts._replace(query=urllib.parse.urlencode(query)).geturl()
        await route.fulfill(response=response, headers=response.headers | {"location": location})

    await page.route("**/auth/login", swap_challenge)
    errors = len(idp.token_errors)
    async with page.expect_response(lambda r: "/auth/callback" in r.url) as callback:
        await page.click("#oidc-signin")
    assert (await callback.value).status == 401
    await page.wait_for_selector("#signin-problem:has-text('invalid_grant')")
    assert idp.token_errors[errors:] == ["invalid_grant"]
    await _shot(page, "wrong-code-verifier")
    assert await _status(page, "/api/events") == 401
    await page.context.close()


async def test_a_tampered_state_is_refused_and_the_real_one_still_works(
    review: ReviewServer, idp: OidcProvider, browser: Any
) -> None:
    idp.interactive = True  # the provider shows its "Continue" link instead of redirecting at once
    try:
        page = await _page(browser, review)
        await page.click("#oidc-signin")
        genuine = await (await page.wait_for_selector("#continue")).get_attribute("href")
        parts = urllib.parse.urlsplit(genuine)
        query = dict(urllib.parse.parse_qsl(parts.query))
        tampered = parts._replace(query=urllib.parse.urlencode(query | {"state": query["state"][::-1]})).geturl()
        assert (await page.goto(tampered)).status == 400
        await page.wait_for_selector("#signin-problem:has-text('unknown, already used or expired')")
        await _shot(page, "tampered-state")
        assert await _status(page, "/api/events") == 401

        # The genuine callback opened in another browser (a page feeding someone else's code): no cookie, refused.
        other = await (await page.context.browser.new_context(ignore_https_errors=True)).new_page()
        assert (await other.goto(genuine)).status == 400
        assert "not started in this browser" in (await other.text_content("#signin-problem") or "")
        await other.context.close()

        # Neither refusal spent the sign-in: the browser that started it still finishes it.
        await page.goto(genuine)
        await page.wait_for_selector("#work:not([hidden])")
        await page.context.close()
    finally:
        idp.interactive = False


async def test_an_answer_naming_another_issuer_is_refused(
    review: ReviewServer, idp: OidcProvider, browser: Any
) -> None:
    idp.interactive = True
    try:
        page = await _page(browser, review)
        await page.click("#oidc-signin")
        genuine = await (await page.wait_for_selector("#continue")).get_attribute("href")
        mixed_up = f"{genuine}&{urllib.parse.urlencode({'iss': 'https://other-idp.example/realms/x'})}"
        assert (await page.goto(mixed_up)).status == 401  # RFC 9207: the code was meant for another IdP
        await page.wait_for_selector("#signin-problem:has-text('another identity provider')")
        await _shot(page, "issuer-mix-up")
        assert await _status(page, "/api/events") == 401
        await page.context.close()
    finally:
        idp.interactive = False


async def test_sign_out_ends_the_session_here_and_at_the_provider(
    review: ReviewServer, idp: OidcProvider, browser: Any
) -> None:
    page = await _page(browser, review)
    await _sign_in(page)
    logouts = len(idp.logouts)
    async with page.expect_navigation(url=f"{_base(review)}/"):
        await page.click("#signout")  # the page, then the provider's end-session endpoint, then back here
    assert idp.logouts[logouts:] == ["dr-oidc"]
    await page.wait_for_selector("#oidc-signin")
    assert await page.is_hidden("#work")
    await _shot(page, "signed-out")
    assert await _status(page, "/api/events") == 401  # the next request is not signed in
    session = await page.evaluate("fetch('/api/session').then(r => r.json())")
    assert session["signedIn"] is False and session["oidcSignIn"] is True
    await page.context.close()


async def test_an_idle_session_is_signed_out(
    dev_credentials: DevCredentials, idp: OidcProvider, browser: Any, tmp_path: Path
) -> None:
    review = await _review_server(tmp_path / "idle", dev_credentials, idp, web_idle_timeout_s=2.0)
    try:
        page = await _page(browser, review)
        await _sign_in(page)
        started = time.monotonic()
        await page.wait_for_selector("#signin-error:has-text('Signed out after being idle')", timeout=15000)
        idle_s = time.monotonic() - started
        assert 2.0 <= idle_s < 12.0, idle_s  # the idle time-out, then at most one keep-alive period (5 s)
        await _shot(page, "idle-signed-out")
        assert await _status(page, "/api/events") == 401
        await page.context.close()
    finally:
        await review.stop()


async def test_the_access_token_is_renewed_with_the_refresh_token(
    dev_credentials: DevCredentials, idp: OidcProvider, browser: Any, tmp_path: Path
) -> None:
    # Renew on every request (the provider's tokens last 300 s): each renewal rotates the refresh token.
    review = await _review_server(tmp_path / "refresh", dev_credentials, idp, web_oidc_refresh_before_s=3600.0)
    try:
        page = await _page(browser, review)
        await _sign_in(page)
        (session,) = review.page.sessions._sessions.values()  # type: ignore[union-attr]
        first_token, first_refresh = session.token, session.refresh_token
        renewed = idp.refreshes
        assert await _status(page, "/api/events") == 200
        assert idp.refreshes > renewed and session.token != first_token and session.refresh_token != first_refresh
        await _shot(page, "token-renewed")
        # The provider forgets the refresh token (revoked): the page keeps working on its still-valid token.
        idp._refresh.clear()
        assert await _status(page, "/api/events") == 200
        assert session.refresh_token == ""  # and asks no more
        await page.context.close()
    finally:
        await review.stop()
