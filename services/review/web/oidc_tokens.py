"""The pure part of the reviewer page's OIDC sign-in: PKCE (S256), state and nonce, and the ID token's checks.

No HTTP and no web framework: :mod:`services.review.web.oidc_client` talks to the identity provider and
:mod:`services.review.web.oidc` holds the Starlette routes that use both.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from services.security.identity import Identity


class SignInRefused(Exception):
    """A sign-in that stops here: ``status`` and a message for the person in front of the browser."""

    def __init__(
        self, status: int, title: str, message: str, *, audit: str = "UNAUTHENTICATED", identity: Identity | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.title, self.message, self.audit = status, title, message, audit
        self.identity = identity  # who was refused, when the tokens were good (no reviewer role)


# --- PKCE, state and nonce ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_verifier() -> str:
    """86 characters of [A-Za-z0-9_-] (RFC 7636 allows 43-128 unreserved characters): 512 random bits."""
    return secrets.token_urlsafe(64)


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge: BASE64URL(SHA256(ASCII(code_verifier))) without padding (RFC 7636 4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(frozen=True)
class PendingSignIn:
    """What one browser's sign-in keeps here between the redirect to the IdP and the callback."""

    state: str
    nonce: str
    verifier: str
    binding: str  # the value of this browser's sign-in cookie: a state replayed in another browser is refused
    redirect_uri: str
    started: float

    @property
    def challenge(self) -> str:
        return pkce_challenge(self.verifier)


class PendingSignIns:
    """Sign-ins under way, each usable once and only from the browser that started it, for ``timeout_s``.

    Bounded: past ``capacity`` the oldest is forgotten (its callback then says the sign-in expired), so
    a flood of unauthenticated ``/auth/login`` requests costs a fixed amount of memory.
    """

    def __init__(self, *, timeout_s: float, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.capacity, self._clock = timeout_s, capacity, clock
        self._pending: OrderedDict[str, PendingSignIn] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def begin(self, redirect_uri: str) -> PendingSignIn:
        now = self._clock()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if now - oldest.started <= self.timeout_s and len(self._pending) < self.capacity:
                break
            self._pending.popitem(last=False)
        pending = PendingSignIn(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=pkce_verifier(),
            binding=secrets.token_urlsafe(32),
            redirect_uri=redirect_uri,
            started=now,
        )
        self._pending[pending.state] = pending
        return pending

    def finish(self, state: str | None, binding: str | None) -> PendingSignIn:
        """The sign-in ``state`` names, once; refused when unknown, used, expired or from another browser."""
        pending = self._pending.get(state or "")
        if pending is None:
            raise SignInRefused(400, "Sign-in not recognised", "This sign-in is unknown, already used or expired.")
        if not binding or not secrets.compare_digest(binding, pending.binding):
            # Not consumed: a forged callback must not cancel the real user's sign-in under way.
            raise SignInRefused(
                400, "Sign-in not recognised", "This sign-in was not started in this browser (state mismatch)."
            )
        del self._pending[pending.state]
        if self._clock() - pending.started > self.timeout_s:
            raise SignInRefused(400, "Sign-in expired", "This sign-in took too long; please start again.")
        return pending


def verify_id_token(
    token: str,
    key: jwt.PyJWK,
    *,
    algorithms: list[str],
    issuer: str,
    client_id: str,
    nonce: str,
    leeway_s: float,
) -> dict[str, Any]:
    """The ID token's claims, checked as OIDC Core 3.1.3.7 asks (signature, iss, aud/azp, exp, iat, nonce)."""
    try:
        alg = str(jwt.get_unverified_header(token).get("alg", ""))
        if alg not in algorithms:
            raise SignInRefused(401, "Sign-in failed", f"The ID token's algorithm {alg[:16]!r} is not accepted.")
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=client_id,
            issuer=issuer,
            leeway=leeway_s,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.PyJWTError as exc:
        raise SignInRefused(401, "Sign-in failed", f"The ID token was not accepted ({type(exc).__name__}).") from None
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise SignInRefused(401, "Sign-in failed", "The ID token was issued to another client (azp).")
    if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
        raise SignInRefused(401, "Sign-in failed", "The ID token does not answer this sign-in (nonce mismatch).")
    return claims


__all__ = [
    "PendingSignIn",
    "PendingSignIns",
    "SignInRefused",
    "pkce_challenge",
    "pkce_verifier",
    "verify_id_token",
]
