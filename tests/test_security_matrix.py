"""Every RPC of every service x every kind of token, against the real gateway and review service over TLS.

The RPCs are enumerated from the service descriptors, so a new RPC is in this matrix the day it is
added; the policy table must then name its roles or it is refused to everyone. Health stays open.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.client
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medgate.v1 import inference_pb2, report_pb2, review_pb2
from services.gateway.server import GatewayServer
from services.review.server import ReviewServer
from services.security.credentials import (
    DevCredentials,
    ensure_dev_credentials,
    load_signing_key,
    mint_token,
    new_signing_key,
)
from services.security.identity import Role
from services.security.policy import RPC_ROLES
from services.settings import PROJECT_ROOT, SecuritySettings, load_settings
from tests.conftest import free_port

SERVICES = {
    "gateway": [
        inference_pb2.DESCRIPTOR.services_by_name["Inference"],
        report_pb2.DESCRIPTOR.services_by_name["Report"],
    ],
    "review": [review_pb2.DESCRIPTOR.services_by_name["Review"]],
}
METHODS = [
    (server, f"/{service.full_name}/{method.name}", method)
    for server, services in SERVICES.items()
    for service in services
    for method in service.methods
]


def test_every_rpc_is_in_the_policy_table() -> None:
    assert {name for _, name, _ in METHODS} == set(RPC_ROLES)
    assert all(RPC_ROLES[name] for _, name, _ in METHODS)


@dataclasses.dataclass
class Stack:
    credentials: DevCredentials
    security: SecuritySettings
    ports: dict[str, int]


@pytest.fixture(scope="module")
async def stack(triton_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("security")
    creds_dir = root / "credentials"
    security_values = {
        "tls": True,
        "auth": True,
        "credentials_dir": creds_dir,
        "cert_file": creds_dir / "server.pem",
        "key_file": creds_dir / "server.key",
        "client_ca_file": creds_dir / "ca.pem",
        "jwks_file": creds_dir / "jwks.json",
        "router_token_file": creds_dir / "router.token",
        "audit_dir": creds_dir.parent / "audit",
    }
    flows = root / "flows.toml"
    flows.write_text(
        (PROJECT_ROOT / "config" / "flows.toml").read_text().replace('output_dir = "', f'output_dir = "{root}/')
    )
    settings = load_settings(
        security=security_values,
        gateway={"port": 0, "metrics_port": 0},
        review={
            "store_path": root / "review.sqlite3",
            "flows_file": flows,
            "port": free_port(),
            "outbox_dir": root / "outbox",
            "web_port": 0,  # the reviewer page beside it on a free port, never the default 8080
        },
    )
    credentials = ensure_dev_credentials(settings.security)
    review = ReviewServer(settings.review, settings.security)
    await review.start()
    gateway = GatewayServer(settings, triton_url)
    await gateway.start(port=0)
    try:
        ports = {"gateway": gateway.port, "review": review.port, "metrics": gateway.metrics_port}
        yield Stack(credentials, settings.security, ports)
    finally:
        await gateway.stop()
        await review.stop()


def _channel(stack: Stack, server: str, *, ca: Path | None = None) -> grpc.aio.Channel:
    roots = (ca or stack.credentials.ca_cert).read_bytes()
    return grpc.aio.secure_channel(f"localhost:{stack.ports[server]}", grpc.ssl_channel_credentials(roots))


def _token(stack: Stack, case: str, role: str) -> str | None:
    key = load_signing_key(stack.credentials.signing_key)
    s = stack.security
    good = {"issuer": s.issuer, "audience": s.audience, "subject": "matrix-user", "roles": [role]}
    if case == "none":
        return None
    if case == "expired":
        return mint_token(
            key, **good, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2), lifetime=dt.timedelta(hours=1)
        )
    if case == "not_yet_valid":
        return mint_token(key, **good, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    if case == "wrong_audience":
        return mint_token(key, **{**good, "audience": "someone-else"})
    if case == "wrong_issuer":
        return mint_token(key, **{**good, "issuer": "https://evil.invalid"})
    if case == "bad_signature":  # another key claiming the server's key id
        return mint_token(new_signing_key(kid=key.kid), **good)
    if case == "alg_none":
        return mint_token(None, **good, algorithm="none", headers={"kid": key.kid})
    if case == "no_subject":
        return mint_token(key, **{**good, "subject": None})
    return mint_token(key, **good)  # "valid": the role decides


def _wrong_role(allowed: frozenset[str]) -> str:
    return next(
        role.value for role in (Role.INFERENCE, Role.REVIEWER, Role.ROUTER, Role.ADMIN) if role.value not in allowed
    )


async def _call(channel: grpc.aio.Channel, name: str, method: object, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    identity: Callable[[bytes], bytes] = lambda body: body  # noqa: E731
    client_streaming = method.client_streaming  # type: ignore[attr-defined]
    server_streaming = method.server_streaming  # type: ignore[attr-defined]
    try:
        if not client_streaming and not server_streaming:
            await channel.unary_unary(name, request_serializer=identity, response_deserializer=identity)(
                b"", metadata=metadata, timeout=20
            )
        elif not client_streaming:
            async for _ in channel.unary_stream(name, request_serializer=identity, response_deserializer=identity)(
                b"", metadata=metadata, timeout=3
            ):
                break
        else:
            call = channel.stream_stream(name, request_serializer=identity, response_deserializer=identity)(
                iter(()), metadata=metadata, timeout=20
            )
            async for _ in call:
                pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


REFUSED_TOKENS = [
    "none",
    "expired",
    "not_yet_valid",
    "wrong_audience",
    "wrong_issuer",
    "bad_signature",
    "alg_none",
    "no_subject",
]


@pytest.mark.parametrize(("server", "name", "method"), METHODS, ids=[name for _, name, _ in METHODS])
async def test_every_rpc_against_every_token(stack: Stack, server: str, name: str, method: object) -> None:
    allowed = RPC_ROLES[name]
    async with _channel(stack, server) as channel:
        for case in REFUSED_TOKENS:
            code = await _call(channel, name, method, _token(stack, case, next(iter(allowed))))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, case, code)
        code = await _call(channel, name, method, _token(stack, "valid", _wrong_role(allowed)))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, "wrong role", code)
        for role in allowed:
            code = await _call(channel, name, method, _token(stack, "valid", role))
            # An empty request reaches the servicer: whatever it answers, it is not an auth refusal.
            assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (name, role, code)
            assert code != grpc.StatusCode.UNKNOWN, (name, role)


async def test_refusals_say_nothing_about_which_check_failed(stack: Stack) -> None:
    details = set()
    async with _channel(stack, "review") as channel:
        stub = review_pb2.DESCRIPTOR.services_by_name["Review"]
        method = stub.methods_by_name["ListHumanLoops"]
        for case in REFUSED_TOKENS:
            token = _token(stack, case, "admin")
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            try:
                await channel.unary_unary(f"/{stub.full_name}/{method.name}")(b"", metadata=metadata)
            except grpc.aio.AioRpcError as error:
                details.add(error.details())
    assert len(details) == 1, details


async def test_health_stays_open_and_plaintext_is_refused(stack: Stack) -> None:
    for server in ("gateway", "review"):
        async with _channel(stack, server) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports[server]}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_trusts_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = ensure_dev_credentials(dataclasses.replace(stack.security, credentials_dir=tmp_path / "other"))
    async with _channel(stack, "gateway", ca=other.ca_cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_metrics_endpoint_is_served_over_tls_only(stack: Stack) -> None:
    url = f"https://localhost:{stack.ports['metrics']}/metrics"
    context = ssl.create_default_context(cafile=str(stack.credentials.ca_cert))
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        assert b"medgate_requests_total" in response.read()
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['metrics']}/metrics", timeout=5).read()
