"""Shared fixtures: a real embedded tritonserver on free loopback ports, started once per session."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import connect
from medgate.v1 import inference_pb2_grpc as pb_grpc
from medgate.v1 import report_pb2_grpc
from services.gateway.server import GatewayServer
from services.review.server import ReviewServer
from services.security.credentials import DevCredentials, dev_security_files, ensure_dev_credentials
from services.security.identity import Role
from services.settings import PROJECT_ROOT, load_settings
from services.triton.embedded import EmbeddedTriton
from tests.postgres import PostgresCluster, PostgresUnavailable

# Servers a test builds from plain settings run on loopback without TLS and tokens; fixtures and tests that
# exercise security pass security={...} explicitly (explicit settings win over the environment).
os.environ.setdefault("MEDGATE_SECURITY_TLS", "false")
os.environ.setdefault("MEDGATE_SECURITY_AUTH", "false")
# Every server keeps an audit trail; the tests' trails go to a throwaway folder, never the checkout's var/audit.
os.environ.setdefault("MEDGATE_SECURITY_AUDIT_DIR", tempfile.mkdtemp(prefix="medgate-test-audit-"))

# The shared servers (review_server, gateway) run as `make run` serves: TLS and bearer tokens, on development
# credentials made for the session; their clients (channel, stub, report_stub, Clients) send the role's token.
# False puts them all back on plaintext without tokens, in one place.
SECURE_FIXTURES = True

# Fixtures that start the real tritonserver (directly or through one they request). A test that uses any of
# them, however indirectly, gets the `triton` marker here, so `make test-fast` (-m "not triton") cannot start one.
TRITON_FIXTURES = frozenset({"triton_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRITON_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.triton)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def security_values(directory: Path, **changes: Any) -> dict[str, Any]:
    """``security={...}`` for load_settings: TLS and tokens from the development credentials in ``directory``."""
    return {
        "tls": True,
        "auth": True,
        **dev_security_files(directory),
        **changes,
    }


@pytest.fixture(scope="session")
def dev_credentials(tmp_path_factory: pytest.TempPathFactory) -> DevCredentials:
    """This session's development CA, server and client certificates, JWKS and one token per role."""
    directory = tmp_path_factory.mktemp("credentials") / "credentials"
    return ensure_dev_credentials(load_settings(security=security_values(directory)).security)


@pytest.fixture(scope="session")
def shared_security(dev_credentials: DevCredentials, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The security settings of the shared servers (audit events under a temp dir, never the checkout's var/)."""
    audit = tmp_path_factory.mktemp("audit")
    if not SECURE_FIXTURES:
        return {"tls": False, "auth": False, "audit_dir": audit}
    return security_values(dev_credentials.directory, audit_dir=audit)


@dataclass(frozen=True)
class Clients:
    """How tests reach the shared servers: channels and command-line flags carrying one role's token."""

    credentials: DevCredentials
    secure: bool = SECURE_FIXTURES

    def security(self, role: Role | str) -> connect.ClientSecurity:
        if not self.secure:
            return connect.ClientSecurity(insecure=True)
        return connect.ClientSecurity(ca_file=self.credentials.ca_cert, token=self.credentials.token(role))

    def channel(self, target: str, role: Role | str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        return connect.aio_channel(target, self.security(role), options)

    def sync_channel(self, target: str, role: Role | str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        return connect.channel(target, self.security(role), options)

    def metrics(self, port: int) -> str:
        """The gateway's /metrics page: HTTPS trusting the session's CA (the endpoint is a listener like gRPC)."""
        if not self.secure:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert))
        url = f"https://localhost:{port}/metrics"
        return urllib.request.urlopen(url, timeout=10, context=context).read().decode()

    def flags(self, role: Role | str) -> list[str]:
        """``medgate`` options for the role: the CA and the token file, or --insecure for plaintext servers."""
        if not self.secure:
            return ["--insecure"]
        return ["--ca", str(self.credentials.ca_cert), "--token-file", str(self.credentials.token_path(role))]


@pytest.fixture(scope="session")
def clients(dev_credentials: DevCredentials) -> Clients:
    return Clients(dev_credentials)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL server for the session (tests/postgres.py); without one: skipped, or failed under CI=true."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {exc}: the PostgreSQL store tests must run in CI")
        pytest.skip(str(exc))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture(scope="session")
def triton_server() -> Iterator[EmbeddedTriton]:
    """The real tritonserver from the pytriton wheel serving triton_models/, all models READY."""
    settings = load_settings(
        triton={"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(), "url": ""}
    )
    logging.getLogger("medgate.triton.server").setLevel(logging.WARNING)
    server = EmbeddedTriton(settings.triton)
    with server:
        yield server


@pytest.fixture(scope="session")
def triton_url(triton_server: EmbeddedTriton) -> str:
    return triton_server.settings.grpc_url


@pytest.fixture(scope="session")
async def review_server(
    tmp_path_factory: pytest.TempPathFactory, shared_security: dict[str, Any]
) -> AsyncIterator[ReviewServer]:
    """A real review service on a fresh store, so routing from real inference can be checked."""
    root = tmp_path_factory.mktemp("review")
    flows = root / "config" / "flows.toml"  # the shipped flows, with their outputs under this temp dir
    flows.parent.mkdir()
    flows.write_text((PROJECT_ROOT / "config" / "flows.toml").read_text())
    settings = load_settings(
        review={"store_path": root / "review.sqlite3", "flows_file": flows, "port": 0, "housekeeping_interval_s": 0.2},
        security=shared_security,
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def gateway(
    triton_url: str,
    review_server: ReviewServer,
    tmp_path_factory: pytest.TempPathFactory,
    shared_security: dict[str, Any],
) -> AsyncIterator[GatewayServer]:
    outbox = tmp_path_factory.mktemp("review-outbox")
    settings = load_settings(
        gateway={"port": 0, "max_prompts": 8, "metrics_port": 0},
        review={"url": f"127.0.0.1:{review_server.port}", "outbox_dir": outbox},
        security=shared_security,
    )
    server = GatewayServer(settings, triton_url)
    await server.start(port=0)
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def channel(gateway: GatewayServer, clients: Clients) -> AsyncIterator[grpc.aio.Channel]:
    """The gateway over TLS with the inference token (the role of a PACS router or ``medgate infer``)."""
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    async with clients.channel(f"127.0.0.1:{gateway.port}", Role.INFERENCE, options) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def report_stub(channel: grpc.aio.Channel) -> report_pb2_grpc.ReportStub:
    """medgate.v1.Report on the same gateway (and so the same Triton) as the Inference tests."""
    return report_pb2_grpc.ReportStub(channel)
