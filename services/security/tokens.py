"""Bearer tokens (JWT) verified against an OIDC issuer's keys or a local JWKS file.

Only the asymmetric algorithms named in the settings are accepted, never the one a token asks for
(``alg: none`` and HMAC with a public key as secret are the classic forgeries); ``iss``, ``aud``,
``exp``, ``nbf`` and ``iat`` are required and checked with a small clock skew. Keys are cached;
an unknown key id triggers one refetch (an identity provider rotating its keys), at most once per
``security.jwks_min_refetch_s`` so a flood of forged key ids cannot hammer it. Fetching happens in
:meth:`TokenVerifier.verify_async` on an executor thread, never on the event loop. Pure: no gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from services.security.errors import Unauthenticated
from services.security.identity import Identity
from services.settings import SecuritySettings

log = logging.getLogger("medgate.security")

_FETCH_TIMEOUT_S = 5.0


def _fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as response:
        document = json.loads(response.read(1 << 20))
    if not isinstance(document, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return document


class KeySource:
    """Public keys by key id; ``refresh()`` blocks (file or network), everything else is a dict lookup."""

    def __init__(self, *, cache_s: float, min_refetch_s: float = 10.0) -> None:
        self.cache_s = cache_s
        self.min_refetch_s = min_refetch_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        raise NotImplementedError

    def cached(self, kid: str | None) -> jwt.PyJWK | None:
        if time.monotonic() - self._fetched_at > self.cache_s:
            return None
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def refresh(self) -> None:
        """Fetch the key set again unless that was done a moment ago."""
        with self._lock:
            now = time.monotonic()
            if self._keys and now - self._fetched_at < self.min_refetch_s:
                return
            document = self._load()
            keys: dict[str, jwt.PyJWK] = {}
            for entry in document.get("keys", []):
                if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
                    continue
                try:
                    key = jwt.PyJWK.from_dict(dict(entry))
                except jwt.PyJWTError:
                    continue  # a key type or algorithm we do not use
                keys[str(entry.get("kid", ""))] = key
            self._keys = keys
            self._fetched_at = now


class JwksFile(KeySource):
    """The embedded default: a JWKS file (``var/credentials/jwks.json``), re-read when it changes."""

    def __init__(self, path: Path, *, cache_s: float) -> None:
        super().__init__(cache_s=cache_s, min_refetch_s=0.0)
        self.path = path
        self._mtime = 0.0

    def cached(self, kid: str | None) -> jwt.PyJWK | None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return None
        return None if mtime != self._mtime else super().cached(kid)

    def _load(self) -> dict[str, Any]:
        self._mtime = self.path.stat().st_mtime
        document = json.loads(self.path.read_text())
        return document if isinstance(document, dict) else {}


class OidcIssuer(KeySource):
    """An identity provider (Keycloak, Entra ID, ...): its discovery document names the JWKS URI."""

    def __init__(self, issuer: str, *, cache_s: float, min_refetch_s: float = 10.0) -> None:
        super().__init__(cache_s=cache_s, min_refetch_s=min_refetch_s)
        self.issuer = issuer.rstrip("/")
        self._jwks_uri = ""

    def _load(self) -> dict[str, Any]:
        if not self._jwks_uri:
            discovery = _fetch_json(f"{self.issuer}/.well-known/openid-configuration")
            if str(discovery.get("issuer", "")).rstrip("/") != self.issuer:
                raise ValueError("the discovery document names another issuer")
            self._jwks_uri = str(discovery["jwks_uri"])
        return _fetch_json(self._jwks_uri)


def _claim(claims: Mapping[str, Any], dotted: str) -> Any:
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True)
class _Header:
    kid: str | None
    alg: str


class TokenVerifier:
    """Turns ``Bearer`` tokens into :class:`Identity`; raises :class:`Unauthenticated` for anything else.

    A client sends the same token on every call, and an ES256 check costs about 0.2 ms of Python CPU:
    a verified token is remembered (by its SHA-256) for ``verified_cache_s`` at most and never past its
    ``exp``, so a key withdrawn from the JWKS stops being honoured within that time.
    """

    verified_cache_s = 60.0
    verified_cache_size = 4096

    def __init__(self, settings: SecuritySettings, keys: KeySource | None = None) -> None:
        self._verified: dict[bytes, tuple[Identity, float]] = {}
        self.settings = settings
        self.algorithms = settings.algorithm_list
        self.issuer = settings.oidc_issuer.rstrip("/") or settings.issuer
        if keys is None:
            keys = (
                OidcIssuer(
                    settings.oidc_issuer, cache_s=settings.jwks_cache_s, min_refetch_s=settings.jwks_min_refetch_s
                )
                if settings.oidc_issuer
                else JwksFile(settings.jwks_file, cache_s=settings.jwks_cache_s)
            )
        self.keys = keys

    def _header(self, token: str) -> _Header:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("not a JWT") from None
        alg = str(header.get("alg", ""))
        if alg not in self.algorithms:
            raise Unauthenticated(f"algorithm {alg[:16]!r} is not accepted")
        kid = header.get("kid")
        return _Header(kid=str(kid) if kid is not None else None, alg=alg)

    def _remembered(self, token: str, *, peer: str, node: str) -> tuple[bytes, Identity | None]:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        entry = self._verified.get(digest)
        if entry is None:
            return digest, None
        identity, until = entry
        if time.time() >= until:
            del self._verified[digest]
            return digest, None
        return digest, dataclasses.replace(identity, peer=peer, node=node)

    def _remember(self, digest: bytes, identity: Identity, expires_at: float) -> None:
        if len(self._verified) >= self.verified_cache_size:
            self._verified.clear()  # rare (that many distinct live tokens): start afresh
        until = min(expires_at, time.time() + self.verified_cache_s)
        self._verified[digest] = (identity, until)

    def _decode(self, token: str, key: jwt.PyJWK, alg: str, *, peer: str, node: str) -> tuple[Identity, float]:
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=self.issuer,
                leeway=self.settings.clock_skew_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(type(exc).__name__) from None
        roles = _claim(claims, self.settings.roles_claim)
        role_names = frozenset(str(r) for r in roles) if isinstance(roles, list | tuple) else frozenset()
        identity = Identity(
            subject=str(claims["sub"])[:256],
            issuer=str(claims["iss"])[:256],
            roles=role_names,
            name=str(claims.get("preferred_username", ""))[:256],
            node=node,
            peer=peer,
        )
        return identity, float(claims["exp"]) + self.settings.clock_skew_s

    def verify(self, token: str, *, peer: str = "", node: str = "") -> Identity:
        """Blocking variant (fetches keys inline when needed): for tests and threads."""
        digest, known = self._remembered(token, peer=peer, node=node)
        if known is not None:
            return known
        header = self._header(token)
        key = self.keys.cached(header.kid)
        if key is None:
            self._refresh()
            key = self.keys.cached(header.kid)
        if key is None:
            raise Unauthenticated("unknown signing key")
        return self._checked(digest, token, key, header.alg, peer=peer, node=node)

    def _checked(self, digest: bytes, token: str, key: jwt.PyJWK, alg: str, *, peer: str, node: str) -> Identity:
        identity, expires_at = self._decode(token, key, alg, peer=peer, node=node)
        self._remember(digest, identity, expires_at)
        return identity

    async def verify_async(self, token: str, *, peer: str = "", node: str = "") -> Identity:
        """Verify on the event loop; only a key fetch (rare) goes to an executor thread."""
        digest, known = self._remembered(token, peer=peer, node=node)
        if known is not None:
            return known
        header = self._header(token)
        key = self.keys.cached(header.kid)
        if key is None:
            await asyncio.get_running_loop().run_in_executor(None, self._refresh)
            key = self.keys.cached(header.kid)
        if key is None:
            raise Unauthenticated("unknown signing key")
        return self._checked(digest, token, key, header.alg, peer=peer, node=node)

    def _refresh(self) -> None:
        try:
            self.keys.refresh()
        except Exception as exc:  # the IdP or the file is away: no key, so no token verifies
            log.warning("signing keys could not be loaded: %s", type(exc).__name__)
