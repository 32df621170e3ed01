"""TLS and identity against a real review server: mutual TLS, certificate rotation without restart, and an
OIDC issuer (discovery document + JWKS over HTTP, served by the test) that rotates its signing key mid-run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.security.credentials import (
    DevCredentials,
    dev_security_files,
    ensure_dev_credentials,
    jwks_of,
    mint_token,
    new_signing_key,
)
from services.settings import SecuritySettings, load_settings
from tests.test_review_service import write_flows


def _security(directory: Path, **overrides: Any) -> SecuritySettings:
    values: dict[str, Any] = {
        "tls": True,
        "auth": True,
        **dev_security_files(directory),
        "audit_dir": directory.parent / "audit",
    }
    values.update(overrides)
    return load_settings(security=values).security


async def _serve(tmp_path: Path, security: SecuritySettings) -> ReviewServer:
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": write_flows(tmp_path), "port": 0}
    )
    server = ReviewServer(settings.review, security)
    await server.start(port=0)
    return server


async def _list_flows(port: int, ca: Path, token: str, *, cert: tuple[Path, Path] | None = None) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(),
        private_key=cert[1].read_bytes() if cert else None,
        certificate_chain=cert[0].read_bytes() if cert else None,
    )
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            await pb_grpc.ReviewStub(channel).ListFlowDefinitions(
                pb.ListFlowDefinitionsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def mutual(tmp_path: Path) -> AsyncIterator[tuple[ReviewServer, DevCredentials]]:
    security = _security(tmp_path / "credentials", require_client_cert=True)
    credentials = ensure_dev_credentials(security)
    server = await _serve(tmp_path, security)
    yield server, credentials
    await server.stop()


async def test_mutual_tls_wants_a_certificate_from_its_ca(
    mutual: tuple[ReviewServer, DevCredentials], tmp_path: Path
) -> None:
    server, creds = mutual
    token = creds.token("reviewer")
    assert (
        await _list_flows(server.port, creds.ca_cert, token, cert=(creds.client_cert, creds.client_key))
        == grpc.StatusCode.OK
    )
    assert await _list_flows(server.port, creds.ca_cert, token) == grpc.StatusCode.UNAVAILABLE
    stranger = ensure_dev_credentials(dataclasses.replace(_security(tmp_path / "stranger")))
    untrusted = (stranger.client_cert, stranger.client_key)
    assert await _list_flows(server.port, creds.ca_cert, token, cert=untrusted) == grpc.StatusCode.UNAVAILABLE


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    security = _security(tmp_path / "credentials")
    old = ensure_dev_credentials(security)
    token = old.token("reviewer")
    server = await _serve(tmp_path, security)
    try:
        assert await _list_flows(server.port, old.ca_cert, token) == grpc.StatusCode.OK
        renewed = ensure_dev_credentials(_security(tmp_path / "renewed"))  # another CA, as after a re-issue
        kept_ca = tmp_path / "old-ca.pem"
        shutil.copy(old.ca_cert, kept_ca)
        for name in ("server.pem", "server.key"):
            shutil.copy(renewed.directory / name, old.directory / name)
        assert await _list_flows(server.port, renewed.ca_cert, token) == grpc.StatusCode.OK
        assert await _list_flows(server.port, kept_ca, token) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


class _Issuer:
    """A minimal OIDC provider: discovery and JWKS over HTTP, with keys the test can swap."""

    def __init__(self) -> None:
        self.keys = [new_signing_key(kid="key-1")]
        self.jwks_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/protocol/openid-connect/certs"}
                elif self.path.endswith("/certs"):
                    issuer.jwks_requests += 1
                    body = jwks_of(*issuer.keys)
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/realms/medgate"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def token(self, key_index: int, roles: list[str]) -> str:
        return mint_token(self.keys[key_index], issuer=self.url, audience="medgate", subject="dr-oidc", roles=roles)


@pytest.fixture
def oidc() -> Iterator[_Issuer]:
    issuer = _Issuer()
    yield issuer
    issuer.http.shutdown()


async def test_tokens_from_an_oidc_issuer_and_a_key_rotation(tmp_path: Path, oidc: _Issuer) -> None:
    security = _security(tmp_path / "credentials", oidc_issuer=oidc.url, jwks_min_refetch_s=0.0)
    creds = ensure_dev_credentials(security)  # TLS material only: the tokens come from the issuer
    server = await _serve(tmp_path, security)
    try:
        first = oidc.token(0, ["reviewer"])
        assert await _list_flows(server.port, creds.ca_cert, first) == grpc.StatusCode.OK
        assert await _list_flows(server.port, creds.ca_cert, creds.token("reviewer")) == grpc.StatusCode.UNAUTHENTICATED
        oidc.keys = [new_signing_key(kid="key-2")]  # the IdP rotates: key-1 is gone from its JWKS
        rotated = oidc.token(0, ["reviewer"])
        fetched = oidc.jwks_requests
        assert await _list_flows(server.port, creds.ca_cert, rotated) == grpc.StatusCode.OK
        assert oidc.jwks_requests == fetched + 1  # the unknown key id made the server fetch the JWKS again
        assert (
            await _list_flows(server.port, creds.ca_cert, oidc.token(0, ["inference"]))
            == grpc.StatusCode.PERMISSION_DENIED
        )
    finally:
        await server.stop()
