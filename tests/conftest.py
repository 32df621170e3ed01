"""Shared fixtures: a real embedded tritonserver on free loopback ports, started once per session."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from medgate.v1 import inference_pb2_grpc as pb_grpc
from medgate.v1 import report_pb2_grpc
from services.gateway.server import GatewayServer
from services.review.server import ReviewServer
from services.settings import PROJECT_ROOT, load_settings
from services.triton.embedded import EmbeddedTriton

# Servers a test builds from plain settings run on loopback without TLS and tokens; fixtures and tests that
# exercise security pass security={...} explicitly (explicit settings win over the environment).
os.environ.setdefault("MEDGATE_SECURITY_TLS", "false")
os.environ.setdefault("MEDGATE_SECURITY_AUTH", "false")

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
async def review_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReviewServer]:
    """A real review service on a fresh store, so routing from real inference can be checked."""
    root = tmp_path_factory.mktemp("review")
    flows = root / "config" / "flows.toml"  # the shipped flows, with their outputs under this temp dir
    flows.parent.mkdir()
    flows.write_text((PROJECT_ROOT / "config" / "flows.toml").read_text())
    settings = load_settings(
        review={"store_path": root / "review.sqlite3", "flows_file": flows, "port": 0, "housekeeping_interval_s": 0.2}
    )
    server = ReviewServer(settings.review)
    await server.start(port=0)
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def gateway(
    triton_url: str, review_server: ReviewServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayServer]:
    outbox = tmp_path_factory.mktemp("review-outbox")
    settings = load_settings(
        gateway={"port": 0, "max_prompts": 8, "metrics_port": 0},
        review={"url": f"127.0.0.1:{review_server.port}", "outbox_dir": outbox},
    )
    server = GatewayServer(settings, triton_url)
    await server.start(port=0)
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def channel(gateway: GatewayServer) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def report_stub(channel: grpc.aio.Channel) -> report_pb2_grpc.ReportStub:
    """medgate.v1.Report on the same gateway (and so the same Triton) as the Inference tests."""
    return report_pb2_grpc.ReportStub(channel)
