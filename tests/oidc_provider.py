"""A small but real OpenID Connect provider for tests, served by uvicorn on a free loopback port.

Discovery, JWKS, ``authorize`` (auto-approves :attr:`OidcProvider.user`, as an IdP with a live session
would), ``token`` (authorization code with PKCE S256 enforced, and the refresh-token grant, for public and
confidential clients) and ``logout`` (RP-initiated logout). It checks what a real provider checks: the
client, the exact registered redirect URI, the one-time code, its expiry, the code verifier against the
challenge, the client's secret. Tokens are ES256 JWTs with Keycloak's ``realm_access.roles`` claim.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import html
import re
import secrets
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from services.security.credentials import jwks_of, mint_token, new_signing_key

_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


@dataclass
class TestUser:
    """Who the provider signs in (its "logged-in user")."""

    __test__ = False  # not a pytest class

    subject: str = "dr-oidc"
    roles: list[str] = field(default_factory=lambda: ["reviewer"])
    name: str = "dr.oidc"


@dataclass
class TestClient:
    __test__ = False

    client_id: str
    secret: str = ""  # empty: a public client
    redirect_uris: set[str] = field(default_factory=set)
    post_logout_redirect_uris: set[str] = field(default_factory=set)


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    user: TestUser
    issued: float


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: pytest owns the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OidcProvider:
    """``await start()``; ``issuer`` is then ``http://127.0.0.1:<port>/realms/test``."""

    def __init__(self, *, audience: str = "medgate", access_lifetime_s: int = 300, code_lifetime_s: float = 60) -> None:
        self.key = new_signing_key(kid=f"test-idp-{secrets.token_hex(4)}")
        self.audience = audience
        self.access_lifetime_s = access_lifetime_s
        self.code_lifetime_s = code_lifetime_s
        self.user = TestUser()
        # False: authorize redirects straight back (a live IdP session); True: it shows a page with a
        # "Continue" link instead (as a consent screen would), so a test can read or alter the callback.
        self.interactive = False
        self.clients: dict[str, TestClient] = {}
        self.issuer = ""
        # What happened, for the tests to assert on.
        self.token_errors: list[str] = []
        self.exchanges: list[dict[str, str]] = []  # one per code exchanged: client id, how it authenticated
        self.refreshes = 0
        self.logouts: list[str] = []  # subjects whose session ended through the end-session endpoint
        self._codes: dict[str, _Grant] = {}
        self._refresh: dict[str, tuple[str, TestUser]] = {}
        prefix = "/realms/test"
        self.app = Starlette(
            routes=[
                Route(f"{prefix}/.well-known/openid-configuration", self.discovery),
                Route(f"{prefix}/jwks", self.jwks),
                Route(f"{prefix}/authorize", self.authorize),
                Route(f"{prefix}/token", self.token, methods=["POST"]),
                Route(f"{prefix}/logout", self.logout),
            ]
        )
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        self.issuer = f"http://127.0.0.1:{sock.getsockname()[1]}/realms/test"
        config = uvicorn.Config(self.app, lifespan="off", ws="none", log_level="warning", access_log=False)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def register(self, client: TestClient) -> TestClient:
        self.clients[client.client_id] = client
        return client

    def access_token(self, user: TestUser, *, client_id: str = "", lifetime_s: int | None = None) -> str:
        """An access token for the API audience, as this provider issues at its token endpoint."""
        return mint_token(
            self.key,
            issuer=self.issuer,
            audience=self.audience,
            subject=user.subject,
            roles=user.roles,
            lifetime=dt.timedelta(seconds=lifetime_s or self.access_lifetime_s),
            claims={"preferred_username": user.name, "azp": client_id or None},
        )

    # --- endpoints -------------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "end_session_endpoint": f"{self.issuer}/logout",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
                "subject_types_supported": ["public"],
            }
        )

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(jwks_of(self.key))

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        client = self.clients.get(q.get("client_id", ""))
        redirect_uri = q.get("redirect_uri", "")
        if client is None or redirect_uri not in client.redirect_uris:
            # Never redirect to an unregistered address (an open redirector would leak the code).
            return PlainTextResponse("unknown client or unregistered redirect_uri", status_code=400)

        def back(**params: str) -> Response:
            params["state"] = q.get("state", "")
            url = f"{redirect_uri}?{urllib.parse.urlencode(params)}"
            if self.interactive:
                link = html.escape(url, quote=True)
                body = f'<!doctype html><title>test IdP</title><a id="continue" href="{link}">Continue</a>'
                return HTMLResponse(body)
            return RedirectResponse(url, status_code=302)

        if q.get("response_type") != "code" or "openid" not in q.get("scope", "").split():
            return back(error="unsupported_response_type")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return back(error="invalid_request", error_description="PKCE with S256 is required")
        code = secrets.token_urlsafe(32)
        self._codes[code] = _Grant(
            client.client_id, redirect_uri, q["code_challenge"], q.get("nonce", ""), self.user, time.monotonic()
        )
        return back(code=code)

    def _client(self, request: Request, form: dict[str, str]) -> tuple[TestClient | None, str]:
        """The authenticated client and how it authenticated (basic, post or none)."""
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            raw = base64.b64decode(header[6:]).decode()
            client_id, _, secret = raw.partition(":")
            client_id, secret = urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)
            method = "client_secret_basic"
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
            method = "client_secret_post" if secret else "none"
        client = self.clients.get(client_id)
        if client is None or not secrets.compare_digest(client.secret, secret):
            return None, method
        return client, method

    def _error(self, error: str, description: str, status: int = 400) -> Response:
        self.token_errors.append(error)
        return JSONResponse({"error": error, "error_description": description}, status_code=status)

    async def token(self, request: Request) -> Response:
        form = {k: v[-1] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()}
        client, method = self._client(request, form)
        if client is None:
            return self._error("invalid_client", "client authentication failed", 401)
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            entry = self._refresh.pop(form.get("refresh_token", ""), None)
            if entry is None or entry[0] != client.client_id:
                return self._error("invalid_grant", "unknown refresh token")
            self.refreshes += 1
            return self._tokens(client, entry[1], nonce="")
        if grant_type != "authorization_code":
            return self._error("unsupported_grant_type", str(grant_type))
        grant = self._codes.pop(form.get("code", ""), None)  # one use, whatever happens next
        if grant is None or time.monotonic() - grant.issued > self.code_lifetime_s:
            return self._error("invalid_grant", "unknown, used or expired code")
        if grant.client_id != client.client_id or grant.redirect_uri != form.get("redirect_uri"):
            return self._error("invalid_grant", "the code was issued to another client or redirect_uri")
        verifier = form.get("code_verifier", "")
        computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not _VERIFIER.fullmatch(verifier) or not secrets.compare_digest(computed, grant.challenge):
            return self._error("invalid_grant", "PKCE verification failed")
        self.exchanges.append({"client_id": client.client_id, "auth": method})
        return self._tokens(client, grant.user, nonce=grant.nonce)

    def _tokens(self, client: TestClient, user: TestUser, *, nonce: str) -> Response:
        id_token = mint_token(
            self.key,
            issuer=self.issuer,
            audience=client.client_id,
            subject=user.subject,
            roles=user.roles,
            claims={"preferred_username": user.name, "azp": client.client_id, "nonce": nonce or None},
        )
        refresh = secrets.token_urlsafe(32)
        self._refresh[refresh] = (client.client_id, user)
        body = {
            "access_token": self.access_token(user, client_id=client.client_id),
            "token_type": "Bearer",
            "expires_in": self.access_lifetime_s,
            "refresh_token": refresh,
            "id_token": id_token,
            "scope": "openid profile",
        }
        return JSONResponse(body, headers={"cache-control": "no-store"})

    async def logout(self, request: Request) -> Response:
        q = request.query_params
        client = self.clients.get(q.get("client_id", ""))
        try:
            claims = jwt.decode(
                q.get("id_token_hint", ""),
                jwt.PyJWK.from_dict(self.key.public_jwk()).key,
                algorithms=["ES256"],
                audience=client.client_id if client else None,
                issuer=self.issuer,
                options={"verify_exp": False},
            )
        except jwt.PyJWTError:
            return PlainTextResponse("invalid id_token_hint", status_code=400)
        self.logouts.append(str(claims["sub"]))
        target = q.get("post_logout_redirect_uri", "")
        if client is not None and target in client.post_logout_redirect_uris:
            return RedirectResponse(target, status_code=302)
        return PlainTextResponse("signed out", status_code=200)


__all__ = ["OidcProvider", "TestClient", "TestUser"]
