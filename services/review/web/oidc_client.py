"""The reviewer page as a client of the identity provider: discovery and the token endpoint, over blocking HTTP.

Called on executor threads by :mod:`services.review.web.oidc`; no web framework here.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.settings import ReviewSettings, SecuritySettings

from .oidc_tokens import SignInRefused

_MAX_RESPONSE_BYTES = 1 << 20
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of the discovery document a relying party uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    end_session_endpoint: str

    @classmethod
    def from_discovery(cls, document: dict[str, Any], issuer: str) -> ProviderMetadata:
        if str(document.get("issuer", "")).rstrip("/") != issuer:
            raise ValueError("the discovery document names another issuer")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise ValueError("the identity provider does not support PKCE with S256")
        endpoints = {k: str(document.get(k, "")) for k in ("authorization_endpoint", "token_endpoint")}
        end_session = str(document.get("end_session_endpoint", ""))
        for url in [*endpoints.values(), end_session]:
            if url:
                check_endpoint(url)
        if not all(endpoints.values()):
            raise ValueError("the discovery document lacks authorization_endpoint or token_endpoint")
        return cls(issuer=issuer, end_session_endpoint=end_session, **endpoints)


def check_endpoint(url: str) -> None:
    """HTTPS, or plain HTTP on loopback only (a test IdP): codes, tokens and the client secret cross it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK):
        return
    raise ValueError(f"identity provider endpoints must be https:// (plain http on loopback only), not {url[:80]!r}")


def _http_json(
    url: str, *, timeout_s: float, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON object) of a GET, or of a form POST when ``form``; an error status is an answer too."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers={"Accept": "application/json", **(headers or {})})
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, body = response.status, response.read(_MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read(_MAX_RESPONSE_BYTES)
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ValueError(f"{urllib.parse.urlsplit(url).path} answered HTTP {status} without a JSON object")
    return status, document


@dataclass(frozen=True)
class OidcClient:
    """The page as a client of the IdP, from the settings (``review.web_oidc_*``, ``security.oidc_issuer``)."""

    issuer: str
    client_id: str
    client_secret: str = ""
    client_auth: str = "client_secret_basic"
    redirect_uri: str = ""
    post_logout_redirect_uri: str = ""
    scopes: str = "openid profile"
    http_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, review: ReviewSettings, security: SecuritySettings) -> OidcClient | None:
        if not review.web_oidc_client_id:
            return None
        if not security.oidc_issuer:
            raise ValueError("review.web_oidc_client_id is set but security.oidc_issuer is not: which IdP?")
        check_endpoint(security.oidc_issuer)
        secret = ""
        if review.web_oidc_client_secret_file:
            secret = Path(review.web_oidc_client_secret_file).read_text().strip()
            if not secret:
                raise ValueError("review.web_oidc_client_secret_file is empty")
        return cls(
            issuer=security.oidc_issuer.rstrip("/"),
            client_id=review.web_oidc_client_id,
            client_secret=secret,
            client_auth=review.web_oidc_client_auth,
            redirect_uri=review.web_oidc_redirect_uri,
            post_logout_redirect_uri=review.web_oidc_post_logout_redirect_uri,
            scopes=review.web_oidc_scopes,
            http_timeout_s=review.web_oidc_http_timeout_s,
        )

    def discover(self) -> ProviderMetadata:
        status, document = _http_json(f"{self.issuer}/.well-known/openid-configuration", timeout_s=self.http_timeout_s)
        if status != 200:
            raise ValueError(f"discovery answered HTTP {status}")
        return ProviderMetadata.from_discovery(document, self.issuer)

    def token_request(self, provider: ProviderMetadata, form: dict[str, str]) -> dict[str, Any]:
        """POST to the token endpoint as this client; an error answer is a :class:`SignInRefused`."""
        form = dict(form)
        headers: dict[str, str] = {}
        if not self.client_secret:
            form["client_id"] = self.client_id  # a public client: PKCE is its only proof
        elif self.client_auth == "client_secret_post":
            form |= {"client_id": self.client_id, "client_secret": self.client_secret}
        else:  # client_secret_basic: both parts form-urlencoded first (RFC 6749 2.3.1)
            pair = f"{urllib.parse.quote_plus(self.client_id)}:{urllib.parse.quote_plus(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        status, answer = _http_json(provider.token_endpoint, timeout_s=self.http_timeout_s, form=form, headers=headers)
        if status != 200:
            code = str(answer.get("error", f"HTTP {status}"))[:64]
            raise SignInRefused(
                401, "Sign-in failed", f"The identity provider refused to exchange the sign-in code ({code})."
            )
        if str(answer.get("token_type", "")).lower() != "bearer" or not isinstance(answer.get("access_token"), str):
            raise SignInRefused(502, "Sign-in failed", "The identity provider's token answer has no bearer token.")
        return answer


__all__ = ["OidcClient", "ProviderMetadata", "check_endpoint"]
