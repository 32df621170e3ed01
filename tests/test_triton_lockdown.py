"""Triton behind the gateway: the embedded server's admin protocols answer only callers with its per-start key.

Against the real tritonserver of the session (tests/conftest.py): a client without the key is refused
model-repository, shared-memory, statistics, trace and logging calls over gRPC and HTTP, while health and
inference stay open on loopback; the gateway's own client, which sends the key, still registers its
shared-memory regions and gets the same answers.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.settings import load_settings
from services.triton.client import TritonModels
from services.triton.embedded import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    ADMIN_PROTOCOLS,
    GRPC_ADMIN_HEADER,
    EmbeddedTriton,
    TritonStartError,
    admin_headers,
    admin_key,
    wait_until_ready,
)
from training.phantoms import generate, model_space


def test_the_server_stays_on_loopback_with_its_admin_protocols_restricted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    command = EmbeddedTriton(load_settings().triton, cache_dir=tmp_path).command()
    key = admin_key()
    assert len(key) >= 40 and admin_key() == key  # made once, then shared with our clients
    assert admin_headers() == {GRPC_ADMIN_HEADER: key} and admin_headers(http=True) == {ADMIN_HEADER: key}
    restricted = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={key}"
    assert f"--grpc-restricted-protocol={restricted}" in command
    assert f"--http-restricted-api={restricted}" in command
    for flag in ("--grpc-address", "--http-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command
    assert "inference" not in ADMIN_PROTOCOLS and "health" not in ADMIN_PROTOCOLS
    monkeypatch.delenv(ADMIN_KEY_ENV)
    assert admin_headers() == {}


def _refused(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call(*args, **kwargs)  # type: ignore[operator]
    return refused.value.message() or ""


def test_a_client_without_the_key_is_refused_the_admin_protocols(triton_server: EmbeddedTriton) -> None:
    url = triton_server.settings.grpc_url
    stranger = triton_grpc.InferenceServerClient(url)
    forger = triton_grpc.InferenceServerClient(url)
    wrong = {GRPC_ADMIN_HEADER: "not-the-key"}
    try:
        for client, headers in ((stranger, None), (forger, wrong)):
            for call, args in (
                (client.get_model_repository_index, ()),
                (client.unload_model, ("classifier",)),
                (client.load_model, ("classifier",)),
                (client.register_system_shared_memory, ("intruder", "/intruder", 4096)),
                (client.unregister_system_shared_memory, ()),  # all regions: the gateway's included
                (client.get_system_shared_memory_status, ()),
                (client.get_inference_statistics, ()),
                (client.get_trace_settings, ()),
                (client.get_log_settings, ()),
            ):
                message = _refused(call, *args, headers=headers)
                assert "restricted" in message.lower(), (call.__name__, message)
        # The key's owner is served; health stays open to probes and the models stay READY.
        index = stranger.get_model_repository_index(headers=admin_headers(), as_json=True)
        assert {"classifier", "detector"} <= {entry["name"] for entry in index.get("models", [])}
        assert stranger.is_server_live() and stranger.is_model_ready("classifier")
    finally:
        stranger.close()
        forger.close()


def test_the_http_admin_apis_need_the_key_too(triton_server: EmbeddedTriton) -> None:
    base = f"http://127.0.0.1:{triton_server.settings.http_port}"

    def status(path: str, headers: dict[str, str], body: bytes | None = None) -> int:
        request = urllib.request.Request(base + path, data=body, headers=headers, method="POST" if body else "GET")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            return int(refused.code)

    assert status("/v2/repository/index", {}, b"{}") >= 400
    assert status("/v2/systemsharedmemory/status", {}) >= 400
    assert status("/v2/models/stats", {}) >= 400
    assert status("/v2/repository/index", {ADMIN_HEADER: "not-the-key"}, b"{}") >= 400
    assert status("/v2/repository/index", admin_headers(http=True), b"{}") == 200
    assert status("/v2/health/ready", {}) == 200


@pytest.mark.asyncio(loop_scope="session")
async def test_the_gateway_client_still_uses_shared_memory(triton_server: EmbeddedTriton) -> None:
    url = triton_server.settings.grpc_url
    image = np.asarray(model_space(generate(np.random.default_rng(5)))["image"])
    shared = TritonModels(url, load_settings().models.as_dict(), shared_memory="on")
    wire = TritonModels(url, load_settings().models.as_dict(), shared_memory="off")
    try:
        await shared.connect()
        await wire.connect()
        deadline = time.monotonic() + 60
        np.testing.assert_allclose(
            await shared.classify(image, deadline=deadline), await wire.classify(image, deadline=deadline)
        )
        assert shared.uses_shared_memory, "registration with the key must have been accepted"
        admin = triton_grpc.InferenceServerClient(url)
        try:
            registered = admin.get_system_shared_memory_status(headers=admin_headers(), as_json=True)
        finally:
            admin.close()
        names = {region["name"] for region in registered.get("regions", {}).values()}
        assert set(shared.shared_memory_regions) <= names and shared.shared_memory_regions
    finally:
        await shared.close()
        await wire.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_gateway_without_the_key_goes_over_the_wire(
    triton_server: EmbeddedTriton, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that did not start this Triton (no key): ready checks and inference work, shm turns itself off."""
    url = triton_server.settings.grpc_url
    monkeypatch.setenv(ADMIN_KEY_ENV, "not-the-key")
    assert wait_until_ready(url, ["classifier"], deadline=time.monotonic() + 30) == ["classifier"]
    with pytest.raises(TritonStartError, match="restricts its model repository"):
        wait_until_ready(url, None, deadline=time.monotonic() + 30)
    image = np.asarray(model_space(generate(np.random.default_rng(6)))["image"])
    models = TritonModels(url, {"classifier": "classifier"}, shared_memory="on")
    try:
        await models.connect()
        assert (await models.classify(image, deadline=time.monotonic() + 60)).shape[-1] >= 2
        assert not models.uses_shared_memory
        assert "restricts shared memory to callers with its admin key" in caplog.text
    finally:
        await models.close()
