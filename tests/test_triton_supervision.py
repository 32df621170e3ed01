"""Triton under supervision: a real tritonserver hung (SIGSTOP) and killed (SIGKILL) under a real gateway.

The gateway must notice within 2 s, say NOT_SERVING, answer every call UNAVAILABLE within 100 ms (no retry
spin, one log line per change), and serve again by itself: after a hang once Triton answers, after a kill
once the supervisor has killed the server's process group, unlinked its shared memory and started it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import INFERENCE_SERVICE, GatewayServer, health_name
from services.settings import Settings, load_settings
from services.triton.embedded import EmbeddedTriton, group_members, server_regions
from tests.conftest import free_port
from tests.fixtures import phantom, png_bytes

pytestmark = pytest.mark.triton

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _settings(**triton: object) -> Settings:
    return load_settings(
        triton={"url": "", "http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(), **triton},
        gateway={"port": 0, "metrics_port": -1, "http_enabled": False},
        review={"enabled": False},
        report={"enabled": False},
    )


@pytest.fixture(scope="module")
def settings() -> Settings:
    # hung_restart_s above the SIGSTOP test's pause: that test checks recovery without a restart.
    return _settings(hung_restart_s=30.0, restart_backoff_s=0.5)


@pytest.fixture(scope="module")
def supervised(settings: Settings) -> Iterator[EmbeddedTriton]:
    logging.getLogger("medgate.triton.server").setLevel(logging.WARNING)
    server = EmbeddedTriton(settings.triton)
    with server:
        server.supervise()
        yield server
        pgid, prefix = server.pgid, server.shm_prefix
    assert server.returncode == 0
    assert not group_members(pgid), "stop() must leave no process of the server's group"
    assert not server_regions(prefix), "stop() must unlink the server's shared-memory regions"


@pytest.fixture(scope="module")
async def gateway(supervised: EmbeddedTriton, settings: Settings) -> AsyncIterator[GatewayServer]:
    server = GatewayServer(settings, settings.triton.grpc_url, serve_metrics=False)
    await server.start(port=0)
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def channel(gateway: GatewayServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


REQUEST = pb.ClassifyRequest(image=pb.ImageInput(data=png_bytes(phantom(3).image)))


async def _health(channel: grpc.aio.Channel, service: str = INFERENCE_SERVICE) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(answer.status)


async def _wait_health(channel: grpc.aio.Channel, status: int, within_s: float) -> float:
    started = time.monotonic()
    while await _health(channel) != status:
        assert time.monotonic() - started < within_s, f"health did not turn {status} within {within_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _unavailable_calls(channel: grpc.aio.Channel, count: int) -> list[float]:
    """Seconds per call; every one must end UNAVAILABLE (the caller's deadline is 30 s)."""
    stub = pb_grpc.InferenceStub(channel)
    took = []
    for _ in range(count):
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(REQUEST, timeout=30)
        took.append(time.perf_counter() - started)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "unavailable" in (caught.value.details() or "").lower()
    return took


def _assert_fast(took: list[float]) -> None:
    # 100 ms per call; on 2 shared cores a scheduling hiccup may stretch one, never the typical call.
    assert statistics.median(took) < 0.1, took
    assert sorted(took)[-2] < 0.1, took


def _watch_lines(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.name.startswith("medgate.triton")]


async def test_a_hung_triton_is_noticed_within_2_s_and_served_again_without_a_restart(
    supervised: EmbeddedTriton, gateway: GatewayServer, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = pb_grpc.InferenceStub(channel)
    await stub.Classify(REQUEST, timeout=60)
    assert await _health(channel) == SERVING
    caplog.set_level(logging.INFO, logger="medgate.triton")
    assert supervised.pid is not None
    os.kill(supervised.pid, signal.SIGSTOP)
    try:
        # A call that reached the hung Triton is abandoned when the watch turns down, not at its 30 s deadline.
        in_flight = asyncio.create_task(_unavailable_calls(channel, 1))
        noticed = await _wait_health(channel, NOT_SERVING, within_s=2.0)
        assert await _health(channel, health_name("classifier")) == NOT_SERVING
        (abandoned_s,) = await asyncio.wait_for(in_flight, timeout=5)
        assert abandoned_s < 2.5, abandoned_s
        _assert_fast(await _unavailable_calls(channel, 10))
    finally:
        os.kill(supervised.pid, signal.SIGCONT)
    back = await _wait_health(channel, SERVING, within_s=15.0)
    await stub.Classify(REQUEST, timeout=60)
    assert supervised.restarts == 0  # it only hung for a moment: no restart
    lines = _watch_lines(caplog.records)
    assert sum("is down" in line for line in lines) == 1, lines  # one line per change, none per call
    assert sum("is back after" in line for line in lines) == 1, lines
    assert not [line for line in lines if "retry" in line.lower()], lines
    print(f"hung: NOT_SERVING after {noticed:.2f} s, SERVING {back:.2f} s after SIGCONT")


async def test_a_killed_triton_is_restarted_with_nothing_left_behind(
    supervised: EmbeddedTriton, gateway: GatewayServer, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = pb_grpc.InferenceStub(channel)
    await stub.Classify(REQUEST, timeout=60)
    assert gateway.models.uses_shared_memory
    old_pgid, old_prefix, restarts = supervised.pgid, supervised.shm_prefix, supervised.restarts
    old_stubs = [pid for pid in group_members(old_pgid) if pid != supervised.pid]
    assert old_stubs and server_regions(old_prefix)  # positive control: the stubs and regions exist to be cleaned
    caplog.set_level(logging.INFO, logger="medgate.triton")

    killed = time.monotonic()
    assert supervised.pid is not None
    os.kill(supervised.pid, signal.SIGKILL)
    noticed = await _wait_health(channel, NOT_SERVING, within_s=2.0)
    _assert_fast(await _unavailable_calls(channel, 10))

    # The supervisor kills the orphaned stubs and unlinks the regions before it starts the next server.
    while group_members(old_pgid) or server_regions(old_prefix):
        assert time.monotonic() - killed < 10, (group_members(old_pgid), server_regions(old_prefix))
        await asyncio.sleep(0.1)

    await _wait_health(channel, SERVING, within_s=30.0 - (time.monotonic() - killed))
    recovered = time.monotonic() - killed
    answer = await stub.Classify(REQUEST, timeout=60)
    assert answer.top_label
    assert supervised.restarts == restarts + 1 and supervised.pgid != old_pgid
    assert gateway.models.uses_shared_memory  # the regions were registered with the new server
    lines = _watch_lines(caplog.records)
    assert sum("is down" in line for line in lines) == 1, lines
    assert sum("starting it again" in line for line in lines) == 1, lines
    assert not [line for line in lines if "retry" in line.lower()], lines
    print(f"killed: NOT_SERVING after {noticed:.2f} s, SERVING again after {recovered:.1f} s")


def test_medgate_serve_exits_non_zero_when_triton_stopped_with_an_error(tmp_path: Path) -> None:
    """SIGTERM while the supervisor waits to restart a killed Triton: the exit status says Triton failed."""
    settings = _settings()
    triton, gateway = settings.triton, settings.gateway
    port = free_port()
    env = dict(
        os.environ,
        MEDGATE_TRITON_HTTP_PORT=str(triton.http_port),
        MEDGATE_TRITON_GRPC_PORT=str(triton.grpc_port),
        MEDGATE_TRITON_METRICS_PORT=str(triton.metrics_port),
        MEDGATE_TRITON_RESTART_BACKOFF_S="600",  # the restart never comes in this test
        MEDGATE_GATEWAY_METRICS_PORT="-1",
        MEDGATE_GATEWAY_HTTP_ENABLED="false",
        MEDGATE_REVIEW_ENABLED="false",
        MEDGATE_DICOM_ENABLED="false",
    )
    assert gateway.port == 0
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgate"), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        live = f"http://127.0.0.1:{triton.http_port}/v2/health/ready"
        deadline = time.monotonic() + 300
        while True:
            assert serve.poll() is None, serve.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            try:
                with urllib.request.urlopen(live, timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        server_pid = _pid_listening_on(triton.http_port)
        os.kill(server_pid, signal.SIGKILL)
        time.sleep(1.5)  # the supervisor notices (within 0.1 s) and waits before its restart
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 1, err[-2000:]
    assert "error: tritonserver was killed by SIGKILL" in err, err[-2000:]
    assert "Traceback" not in err


def _pid_listening_on(port: int) -> int:
    """The tritonserver serving ``port`` (its command line names the port)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"tritonserver") and f"--http-port={port}".encode() in command:
            return int(entry.name)
    raise AssertionError(f"no tritonserver with --http-port={port}")


async def test_an_external_triton_is_picked_up_again_when_someone_else_restarts_it() -> None:
    """MEDGATE_TRITON_URL: the gateway restarts nothing, but fails fast while Triton is away and serves again,
    shared memory included, once whoever runs it has started it again (here: an unsupervised server of ours)."""
    settings = _settings()
    external = EmbeddedTriton(settings.triton)
    with external:
        gateway = GatewayServer(settings, settings.triton.grpc_url, serve_metrics=False)
        await gateway.start(port=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                await stub.Classify(REQUEST, timeout=60)
                assert external.pid is not None
                os.kill(external.pid, signal.SIGKILL)
                await _wait_health(channel, NOT_SERVING, within_s=2.0)
                _assert_fast(await _unavailable_calls(channel, 5))
                await asyncio.sleep(1.0)
                assert await _health(channel) == NOT_SERVING  # nobody restarts it: the gateway waits
                await asyncio.to_thread(external.stop)  # what is left of it (its stubs, its regions)
                await asyncio.to_thread(external.start)
                await asyncio.to_thread(external.wait_ready)
                await _wait_health(channel, SERVING, within_s=10.0)
                assert (await stub.Classify(REQUEST, timeout=60)).top_label
                assert gateway.models.uses_shared_memory
        finally:
            await gateway.stop()
