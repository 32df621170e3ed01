"""Token verification without a server: what is cached, and for how long it is trusted."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from services.security.credentials import jwks_json, mint_token, new_signing_key
from services.security.errors import Unauthenticated
from services.security.tokens import TokenVerifier
from services.settings import load_settings

ISSUER, AUDIENCE = "https://idp.test/realms/r", "medgate"


def _verifier(tmp_path: Path) -> tuple[TokenVerifier, Path]:
    jwks = tmp_path / "jwks.json"
    security = load_settings(security={"jwks_file": jwks, "issuer": ISSUER, "audience": AUDIENCE}).security
    return TokenVerifier(security), jwks


def test_a_verified_token_is_remembered_with_the_callers_current_address(tmp_path: Path) -> None:
    verifier, jwks = _verifier(tmp_path)
    key = new_signing_key(kid="k1")
    jwks.write_text(jwks_json(key))
    token = mint_token(key, issuer=ISSUER, audience=AUDIENCE, subject="dr-a", roles=["reviewer"])
    first = verifier.verify(token, peer="ipv4:127.0.0.1:1")
    second = verifier.verify(token, peer="ipv4:127.0.0.1:2")
    assert (first.subject, first.roles) == (second.subject, second.roles) == ("dr-a", frozenset({"reviewer"}))
    assert second.peer == "ipv4:127.0.0.1:2"


def test_a_withdrawn_key_stops_working_once_the_cache_time_is_over(tmp_path: Path) -> None:
    verifier, jwks = _verifier(tmp_path)
    verifier.verified_cache_s = 0.2
    key = new_signing_key(kid="k1")
    jwks.write_text(jwks_json(key))
    token = mint_token(key, issuer=ISSUER, audience=AUDIENCE, subject="dr-a", roles=["reviewer"])
    verifier.verify(token)
    jwks.write_text(jwks_json(new_signing_key(kid="k2")))  # the operator withdraws k1
    verifier.verify(token)  # still within the cache time
    time.sleep(0.25)
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_a_token_is_never_remembered_past_its_expiry(tmp_path: Path) -> None:
    verifier, jwks = _verifier(tmp_path)
    key = new_signing_key(kid="k1")
    jwks.write_text(jwks_json(key))
    # exp = the whole second of issue + 2 s: between 1 and 2 s from now, so the first check passes.
    token = mint_token(
        key, issuer=ISSUER, audience=AUDIENCE, subject="dr-a", roles=["reviewer"], lifetime=dt.timedelta(seconds=2)
    )
    verifier.settings = load_settings(
        security={"jwks_file": jwks, "issuer": ISSUER, "audience": AUDIENCE, "clock_skew_s": 0.0}
    ).security
    verifier.verify(token)
    time.sleep(2.1)
    with pytest.raises(Unauthenticated):
        verifier.verify(token)
