"""Shared fixtures: a real embedded tritonserver on free loopback ports, started once per session."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from services.settings import load_settings
from services.triton.embedded import EmbeddedTriton


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
