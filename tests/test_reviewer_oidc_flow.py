"""The reviewer page's OIDC relying party without a browser: PKCE, state and nonce handling, the ID token's
checks, the settings it refuses, and the code exchange against the real test provider (tests/oidc_provider.py)
as a public and as a confidential client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.review.web.oidc import (
    OidcClient,
    PendingSignIns,
    ProviderMetadata,
    SignInRefused,
    check_endpoint,
    pkce_challenge,
    pkce_verifier,
    verify_id_token,
)
from services.review.web.sessions import Sessions
from services.security.credentials import SigningKey, mint_token, new_signing_key
from services.security.identity import Identity
from services.settings import SettingsError, load_settings
from tests.oidc_provider import OidcProvider, TestClient

CALLBACK = "https://localhost:8443/auth/callback"


def test_s256_challenge_is_rfc7636_appendix_b() -> None:
    assert (
        pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


def test_verifiers_are_fresh_and_within_rfc7636_bounds() -> None:
    verifiers = {pkce_verifier() for _ in range(100)}
    assert len(verifiers) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", v) for v in verifiers)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_state_is_used_once_and_only_from_the_browser_that_started_it() -> None:
    pending = PendingSignIns(timeout_s=60, capacity=10)
    one, two = pending.begin(CALLBACK), pending.begin(CALLBACK)
    assert len({one.state, two.state, one.nonce, two.nonce, one.verifier, two.verifier}) == 6
    with pytest.raises(SignInRefused, match="not started in this browser"):
        pending.finish(one.state, two.binding)  # another browser's cookie: login CSRF
    with pytest.raises(SignInRefused, match="not started in this browser"):
        pending.finish(one.state, None)
    assert pending.finish(one.state, one.binding) == one  # the forged tries did not consume it
    with pytest.raises(SignInRefused, match="unknown, already used or expired"):
        pending.finish(one.state, one.binding)
    with pytest.raises(SignInRefused, match="unknown"):
        pending.finish(one.state[:-2] + "xx", one.binding)  # tampered
    with pytest.raises(SignInRefused, match="unknown"):
        pending.finish(None, two.binding)


def test_pending_sign_ins_expire_and_are_bounded() -> None:
    clock = Clock()
    pending = PendingSignIns(timeout_s=60, capacity=3, clock=clock)
    first = pending.begin(CALLBACK)
    clock.now += 61
    with pytest.raises(SignInRefused, match="took too long"):
        pending.finish(first.state, first.binding)
    flood = [pending.begin(CALLBACK) for _ in range(10)]
    assert len(pending) == 3
    with pytest.raises(SignInRefused, match="unknown"):
        pending.finish(flood[0].state, flood[0].binding)  # the oldest made room
    assert pending.finish(flood[-1].state, flood[-1].binding) == flood[-1]


def _id_token(key: SigningKey, **changes: Any) -> str:
    values: dict[str, Any] = {
        "issuer": "https://idp.example/realms/h",
        "audience": "medgate-review",
        "subject": "dr-a",
        "claims": {"nonce": "n-1", "azp": "medgate-review"},
    }
    values.update(changes)
    return mint_token(key, **values)


def _check(token: str, key: SigningKey, *, nonce: str = "n-1") -> dict[str, Any]:
    return verify_id_token(
        token,
        jwt.PyJWK.from_dict(key.public_jwk()),
        algorithms=["ES256"],
        issuer="https://idp.example/realms/h",
        client_id="medgate-review",
        nonce=nonce,
        leeway_s=30,
    )


def test_id_token_checks() -> None:
    key = new_signing_key(kid="k1")
    assert _check(_id_token(key), key)["sub"] == "dr-a"
    with pytest.raises(SignInRefused, match="nonce mismatch"):
        _check(_id_token(key), key, nonce="n-2")  # a token from another sign-in (replay)
    with pytest.raises(SignInRefused, match="nonce mismatch"):
        _check(_id_token(key, claims={"nonce": None, "azp": "medgate-review"}), key)
    with pytest.raises(SignInRefused, match="InvalidAudienceError"):
        _check(_id_token(key, audience="other-app"), key)
    with pytest.raises(SignInRefused, match="another client"):
        _check(_id_token(key, audience=["medgate-review", "other-app"], claims={"nonce": "n-1", "azp": "other"}), key)
    with pytest.raises(SignInRefused, match="InvalidIssuerError"):
        _check(_id_token(key, issuer="https://evil.example/realms/h"), key)
    with pytest.raises(SignInRefused, match="ExpiredSignatureError"):
        _check(_id_token(key, lifetime=dt.timedelta(minutes=-5)), key)
    with pytest.raises(SignInRefused, match="InvalidSignatureError"):
        _check(_id_token(new_signing_key(kid="k1")), key)  # same key id, another key: a forgery
    with pytest.raises(SignInRefused, match="algorithm 'none'"):
        _check(mint_token(None, issuer="x", audience="medgate-review", subject="a", algorithm="none"), key)


def test_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="openid"):
        load_settings(review={"web_oidc_client_id": "page", "web_oidc_scopes": "profile"})
    with pytest.raises(ValueError, match="client_secret_basic"):
        load_settings(review={"web_oidc_client_auth": "private_key_jwt"})
    config = tmp_path / "medgate.toml"
    config.write_text('[review]\nweb_oidc_client_secret = "in the settings file"\n')
    with pytest.raises(SettingsError, match=r"unknown setting review\.web_oidc_client_secret"):
        load_settings(config)  # a secret goes in web_oidc_client_secret_file, never in the settings
    settings = load_settings(review={"web_oidc_client_id": "page"})
    with pytest.raises(ValueError, match="oidc_issuer is not"):
        OidcClient.from_settings(settings.review, settings.security)
    plain = load_settings(review={"web_oidc_client_id": "page"}, security={"oidc_issuer": "http://idp.example/r"})
    with pytest.raises(ValueError, match="https"):
        OidcClient.from_settings(plain.review, plain.security)
    (tmp_path / "empty").write_text("\n")
    empty = load_settings(
        review={"web_oidc_client_id": "page", "web_oidc_client_secret_file": str(tmp_path / "empty")},
        security={"oidc_issuer": "https://idp.example/r"},
    )
    with pytest.raises(ValueError, match="empty"):
        OidcClient.from_settings(empty.review, empty.security)
    assert OidcClient.from_settings(load_settings().review, load_settings().security) is None


def test_discovery_documents_that_cannot_be_trusted_are_refused() -> None:
    good: dict[str, Any] = {"issuer": "https://idp.example/r", "authorization_endpoint": "https://idp.example/a"}
    good |= {"token_endpoint": "https://idp.example/t", "code_challenge_methods_supported": ["plain", "S256"]}
    assert ProviderMetadata.from_discovery(good, "https://idp.example/r").end_session_endpoint == ""
    with pytest.raises(ValueError, match="another issuer"):
        ProviderMetadata.from_discovery(good | {"issuer": "https://evil.example/r"}, "https://idp.example/r")
    with pytest.raises(ValueError, match="S256"):
        ProviderMetadata.from_discovery(good | {"code_challenge_methods_supported": ["plain"]}, "https://idp.example/r")
    with pytest.raises(ValueError, match="https"):
        ProviderMetadata.from_discovery(good | {"token_endpoint": "http://idp.example/t"}, "https://idp.example/r")
    check_endpoint("http://127.0.0.1:9/x")  # loopback: a test IdP


# --- the code exchange against the real test provider ------------------------------------------------


@pytest.fixture(scope="module")
async def provider() -> AsyncIterator[OidcProvider]:
    idp = OidcProvider()
    await idp.start()
    idp.register(TestClient("public-page", redirect_uris={CALLBACK}))
    idp.register(TestClient("confidential-page", secret="s3cret: with/odd+chars", redirect_uris={CALLBACK}))
    yield idp
    await idp.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def _authorize(idp: OidcProvider, client_id: str, challenge: str) -> str:
    """The code the provider gives a browser for this sign-in (its redirect, not followed)."""
    query = urllib.parse.urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": CALLBACK,
            "scope": "openid",
            "state": "s",
            "nonce": "n",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(f"{idp.issuer}/authorize?{query}", timeout=5)
    except urllib.error.HTTPError as redirect:
        location = redirect.headers["location"]
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    return params["code"][0]


def _exchange(idp: OidcProvider, client: OidcClient, code: str, verifier: str) -> dict[str, Any]:
    provider = client.discover()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "code_verifier": verifier}
    return client.token_request(provider, form)


@pytest.mark.parametrize(
    ("client_id", "secret", "auth"),
    [
        ("public-page", "", "none"),
        ("confidential-page", "s3cret: with/odd+chars", "client_secret_basic"),
        ("confidential-page", "s3cret: with/odd+chars", "client_secret_post"),
    ],
)
async def test_code_exchange_with_pkce(provider: OidcProvider, client_id: str, secret: str, auth: str) -> None:
    client = OidcClient(provider.issuer, client_id, client_secret=secret, client_auth=auth)
    run = asyncio.get_running_loop().run_in_executor
    verifier = pkce_verifier()
    code = await run(None, _authorize, provider, client_id, pkce_challenge(verifier))
    answer = await run(None, _exchange, provider, client, code, verifier)
    assert provider.exchanges[-1] == {"client_id": client_id, "auth": auth}
    assert jwt.decode(answer["id_token"], options={"verify_signature": False})["aud"] == client_id
    with pytest.raises(SignInRefused, match="invalid_grant"):
        await run(None, _exchange, provider, client, code, verifier)  # a code works once

    code = await run(None, _authorize, provider, client_id, pkce_challenge(verifier))
    with pytest.raises(SignInRefused, match="invalid_grant"):
        await run(None, _exchange, provider, client, code, pkce_verifier())  # not the verifier of the challenge
    assert provider.token_errors[-1] == "invalid_grant"


async def test_a_confidential_client_with_a_wrong_secret_is_refused(provider: OidcProvider) -> None:
    run = asyncio.get_running_loop().run_in_executor
    verifier = pkce_verifier()
    code = await run(None, _authorize, provider, "confidential-page", pkce_challenge(verifier))
    wrong = OidcClient(provider.issuer, "confidential-page", client_secret="guess")
    with pytest.raises(SignInRefused, match="invalid_client"):
        await run(None, _exchange, provider, wrong, code, verifier)


def test_a_session_ends_when_idle_or_too_old() -> None:
    clock = Clock()
    sessions = Sessions(idle_timeout_s=60, max_age_s=600, clock=clock)
    who = Identity(subject="dr-a", issuer="https://idp.example/r", roles=frozenset({"reviewer"}))
    idle, busy = sessions.create("t1", who), sessions.create("t2", who)
    assert idle.session_id != busy.session_id
    for _ in range(10):
        clock.now += 59
        assert sessions.get(busy.session_id) is busy  # each request counts as activity
    assert sessions.get(idle.session_id) is None  # nobody asked for over a minute
    clock.now += 59
    assert sessions.get(busy.session_id) is None  # active, but past the absolute lifetime (649 s > 600 s)
