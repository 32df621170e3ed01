"""The reviewer page's sign-in through the hospital's identity provider: OIDC authorization code with PKCE (S256).

The page is a relying party of ``security.oidc_issuer``, the same issuer whose tokens the gRPC API takes.
``/auth/login`` sends the browser to the IdP with a fresh ``state`` (bound to this browser by a short-lived
SameSite=Lax cookie), ``nonce`` and S256 ``code_challenge``; ``/auth/callback`` takes the code back once,
exchanges it with the ``code_verifier`` (as a public or a confidential client), checks the ID token
(signature from the issuer's JWKS, issuer, audience = our client id, expiry, nonce) and then the access
token with the very :class:`~services.security.tokens.TokenVerifier` of the gRPC API: the identity and
roles of the page are those a gRPC call with that token would have. Only then is a server-side session
made; the access token is renewed with the refresh token before it expires, and sign-out sends the browser
to the IdP's ``end_session_endpoint`` when it has one. Every refusal is an HTML page that says why.

This module holds the Starlette routes; the pure PKCE/state/nonce and ID token checks are in
:mod:`.oidc_tokens`, the blocking HTTP to the IdP in :mod:`.oidc_client` (both re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jwt
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from services.security.errors import Unauthenticated
from services.security.identity import Identity
from services.settings import ReviewSettings

from .oidc_client import OidcClient, ProviderMetadata, check_endpoint
from .oidc_tokens import PendingSignIn, PendingSignIns, SignInRefused, pkce_challenge, pkce_verifier, verify_id_token
from .sessions import Session

if TYPE_CHECKING:
    from .app import ReviewPage

log = logging.getLogger("medgate.review.web")

LOGIN_PATH, CALLBACK_PATH = "/auth/login", "/auth/callback"


def _page(status: int, title: str, message: str) -> HTMLResponse:
    """A plain page (no script: the page's CSP holds) that says what happened and leads back to sign-in."""
    t, m = html.escape(title), html.escape(message)
    body = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>medgate review: {t}</title>'
        '<link rel="stylesheet" href="/static/style.css"></head><body><header><strong>medgate review</strong>'
        f'</header><section id="signin"><h1>{t}</h1><p id="signin-problem" class="error" role="alert">{m}</p>'
        '<p><a href="/">Back to sign-in</a></p></section></body></html>'
    )
    return HTMLResponse(body, status_code=status)


def _expiry(access_token: str) -> float:
    """The access token's ``exp`` (already verified by the TokenVerifier; read again here for the refresh)."""
    claims = jwt.decode(access_token, options={"verify_signature": False})
    return float(claims.get("exp", 0))


class OidcSignIn:
    """The sign-in routes of one :class:`~services.review.web.app.ReviewPage` (off when no client is set)."""

    def __init__(self, page: ReviewPage, review: ReviewSettings) -> None:
        self.page = page
        self.client = OidcClient.from_settings(review, page.security)
        self.pending = PendingSignIns(
            timeout_s=review.web_oidc_sign_in_timeout_s, capacity=review.web_oidc_max_pending_sign_ins
        )
        self.refresh_before_s = review.web_oidc_refresh_before_s
        self.cookie = "__Host-medgate-signin" if page.secure_cookie else "medgate-signin"
        self._provider: ProviderMetadata | None = None
        self._provider_at = 0.0
        self.routes = [
            Route(LOGIN_PATH, self.login, methods=["GET"]),
            Route(CALLBACK_PATH, self.callback, methods=["GET"]),
        ]

    @property
    def enabled(self) -> bool:
        return self.client is not None

    async def _run(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def provider(self) -> ProviderMetadata:
        """The IdP's endpoints, discovered off the event loop and kept for ``security.jwks_cache_s``."""
        assert self.client is not None
        if self._provider is None or time.monotonic() - self._provider_at > self.page.security.jwks_cache_s:
            try:
                self._provider = await self._run(self.client.discover)
            except Exception as exc:
                log.warning("the identity provider's discovery failed: %s", type(exc).__name__)
                raise SignInRefused(
                    503, "Identity provider unavailable", "The identity provider cannot be reached; try again shortly."
                ) from None
            self._provider_at = time.monotonic()
        return self._provider

    def _redirect_uri(self, request: Request) -> str:
        assert self.client is not None
        return self.client.redirect_uri or f"{request.url.scheme}://{request.url.netloc}{CALLBACK_PATH}"

    # --- routes ----------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if self.client is None:
            return _page(404, "Not available", "Sign-in through an identity provider is not configured here.")
        try:
            provider = await self.provider()
        except SignInRefused as refused:
            return _page(refused.status, refused.title, refused.message)
        pending = self.pending.begin(self._redirect_uri(request))
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": self.client.client_id,
                "redirect_uri": pending.redirect_uri,
                "scope": self.client.scopes,
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": pending.challenge,
                "code_challenge_method": "S256",
            }
        )
        sep = "&" if "?" in provider.authorization_endpoint else "?"
        response = RedirectResponse(f"{provider.authorization_endpoint}{sep}{query}", status_code=303)
        # Lax, not Strict: the IdP's redirect back is a cross-site navigation that must carry it.
        response.set_cookie(
            self.cookie,
            pending.binding,
            max_age=int(self.pending.timeout_s),
            httponly=True,
            secure=self.page.secure_cookie,
            samesite="lax",
            path="/",
        )
        return response

    async def callback(self, request: Request) -> Response:
        try:
            if self.client is None:
                raise SignInRefused(404, "Not available", "Sign-in through an identity provider is not configured.")
            # A callback that names no sign-in of this browser leaves the browser's own sign-in (and its
            # cookie) alone: a forged link must not cancel a real sign-in under way.
            pending = self.pending.finish(request.query_params.get("state"), request.cookies.get(self.cookie))
        except SignInRefused as refused:
            await self._audit_refusal(request, refused)
            return _page(refused.status, refused.title, refused.message)
        try:
            session = await self._finish(request, pending)
        except SignInRefused as refused:
            await self._audit_refusal(request, refused)
            response: Response = _page(refused.status, refused.title, refused.message)
        else:
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                self.page.cookie,
                session.session_id,
                httponly=True,
                secure=self.page.secure_cookie,
                samesite="strict",
                path="/",
            )
            log.info("reviewer signed in on the web page through the identity provider")
        response.delete_cookie(self.cookie, path="/", secure=self.page.secure_cookie, httponly=True, samesite="lax")
        return response

    async def _audit_refusal(self, request: Request, refused: SignInRefused) -> None:
        from .app import SIGN_IN

        with contextlib.suppress(Exception):  # the writer logs a failure as CRITICAL; the refusal stands
            await self.page._audit(SIGN_IN, refused.audit, request, refused.identity)

    async def _finish(self, request: Request, pending: PendingSignIn) -> Session:
        from .app import PAGE_ROLES, SIGN_IN, HttpError

        params = request.query_params
        assert self.client is not None
        if "iss" in params and params["iss"].rstrip("/") != self.client.issuer:  # RFC 9207: an IdP mix-up
            raise SignInRefused(401, "Sign-in failed", "The sign-in answer comes from another identity provider.")
        if params.get("error"):
            error = params["error"][:64]
            raise SignInRefused(401, "Sign-in refused", f"The identity provider did not sign you in ({error}).")
        code = params.get("code", "")
        if not code or len(code) > 4096:
            raise SignInRefused(400, "Sign-in failed", "The identity provider sent no sign-in code.")
        provider = await self.provider()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.verifier,
        }
        answer = await self._token_request(provider, form)
        id_token = answer.get("id_token")
        if not isinstance(id_token, str):
            raise SignInRefused(502, "Sign-in failed", "The identity provider sent no ID token (is openid a scope?).")
        claims = await self._id_claims(id_token, pending.nonce)
        identity = await self._access_identity(request, answer["access_token"])
        if identity.subject != str(claims["sub"]):
            raise SignInRefused(401, "Sign-in failed", "The ID token and the access token name different users.")
        if not identity.has_any(PAGE_ROLES):
            raise SignInRefused(
                403,
                "Not a reviewer",
                f"You are signed in as {identity.name or identity.subject}, but this account has no reviewer role. "
                "Ask your administrator for the reviewer role at the identity provider.",
                audit="PERMISSION_DENIED",
                identity=identity,
            )
        try:
            await self.page._audit_or_withhold(SIGN_IN, "OK", request, identity)
        except HttpError as exc:
            raise SignInRefused(503, "Sign-in not recorded", exc.message, audit="UNAVAILABLE") from None
        self.page.sessions.drop(request.cookies.get(self.page.cookie))
        refresh = answer.get("refresh_token")
        return self.page.sessions.create(
            answer["access_token"],
            identity,
            refresh_token=refresh if isinstance(refresh, str) else "",
            id_token=id_token,
            token_expires_at=_expiry(answer["access_token"]),
        )

    async def _token_request(self, provider: ProviderMetadata, form: dict[str, str]) -> dict[str, Any]:
        assert self.client is not None
        client = self.client
        try:
            answer: dict[str, Any] = await self._run(lambda: client.token_request(provider, form))
        except SignInRefused:
            raise
        except Exception as exc:
            log.warning("the identity provider's token endpoint failed: %s", type(exc).__name__)
            raise SignInRefused(
                503, "Identity provider unavailable", "The identity provider's token endpoint cannot be reached."
            ) from None
        return answer

    async def _id_claims(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token checked with the signing keys the gRPC API uses for this issuer (one key cache)."""
        assert self.client is not None
        keys = self.page.verifier.keys
        try:
            kid = jwt.get_unverified_header(id_token).get("kid")
        except jwt.PyJWTError:
            raise SignInRefused(401, "Sign-in failed", "The ID token is not a JWT.") from None
        key = keys.cached(str(kid) if kid is not None else None)
        if key is None:
            try:
                await self._run(keys.refresh)
            except Exception as exc:
                log.warning("the identity provider's signing keys could not be loaded: %s", type(exc).__name__)
            key = keys.cached(str(kid) if kid is not None else None)
        if key is None:
            raise SignInRefused(401, "Sign-in failed", "The ID token is signed with a key the issuer does not publish.")
        security = self.page.security
        return verify_id_token(
            id_token,
            key,
            algorithms=security.algorithm_list,
            issuer=self.client.issuer,
            client_id=self.client.client_id,
            nonce=nonce,
            leeway_s=security.clock_skew_s,
        )

    async def _access_identity(self, request: Request, access_token: str) -> Identity:
        """Who the access token says, by the gRPC API's own rules (issuer, audience, expiry, signature, roles)."""
        try:
            return await self.page.verifier.verify_async(access_token, peer=self.page._peer(request))
        except Unauthenticated as exc:
            raise SignInRefused(
                401,
                "Sign-in failed",
                f"The access token is not valid for medgate ({exc}): the IdP must issue it for audience "
                f"{self.page.security.audience!r}.",
            ) from None

    # --- the session's life ------------------------------------------------------------------------

    async def refresh_if_due(self, session: Session) -> None:
        """Renew the session's access token with its refresh token shortly before it expires.

        A failure leaves the old token in place: while it lasts the reviewer works on, and once it
        expires the next check signs the page out.
        """
        if self.client is None or not session.refresh_token:
            return
        if time.time() < session.token_expires_at - self.refresh_before_s:
            return
        async with session.refreshing:
            if time.time() < session.token_expires_at - self.refresh_before_s:
                return
            try:
                provider = await self.provider()
                form = {"grant_type": "refresh_token", "refresh_token": session.refresh_token}
                answer = await self._token_request(provider, form)
                identity = await self.page.verifier.verify_async(answer["access_token"])
            except (SignInRefused, Unauthenticated) as exc:
                log.warning("the page's access token could not be renewed: %s", type(exc).__name__)
                session.refresh_token = ""
                return
            if identity.principal != session.identity.principal:
                session.refresh_token = ""
                return
            session.token = answer["access_token"]
            session.token_expires_at = _expiry(session.token)
            if isinstance(answer.get("refresh_token"), str):
                session.refresh_token = answer["refresh_token"]
            if isinstance(answer.get("id_token"), str):
                session.id_token = answer["id_token"]

    async def end_session_url(self, session: Session | None, request: Request) -> str:
        """Where the browser goes to end the IdP's session too (RP-initiated logout); empty when it cannot."""
        if self.client is None or session is None or not session.id_token:
            return ""
        try:
            provider = await self.provider()
        except SignInRefused:
            return ""
        if not provider.end_session_endpoint:
            return ""
        back = self.client.post_logout_redirect_uri or f"{request.url.scheme}://{request.url.netloc}/"
        query = urllib.parse.urlencode(
            {"id_token_hint": session.id_token, "post_logout_redirect_uri": back, "client_id": self.client.client_id}
        )
        sep = "&" if "?" in provider.end_session_endpoint else "?"
        return f"{provider.end_session_endpoint}{sep}{query}"


__all__ = [
    "CALLBACK_PATH",
    "LOGIN_PATH",
    "OidcClient",
    "OidcSignIn",
    "PendingSignIns",
    "ProviderMetadata",
    "SignInRefused",
    "check_endpoint",
    "pkce_challenge",
    "pkce_verifier",
    "verify_id_token",
]
