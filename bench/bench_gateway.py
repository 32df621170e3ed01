"""Gateway overhead and throughput, measured side by side in one run (``make bench``).

1. Overhead ratio: gateway ``Classify`` on an encoded file against a direct tritonclient call of the
   same model on the same preprocessed tensor, calls interleaved so machine noise hits every arm:
   the gateway in plaintext without tokens (tensors to Triton through shared memory), the same
   with shared memory off (tensors in the gRPC message), the gateway as ``make run`` serves it
   (TLS and a bearer token checked on every call; ``tls_token_over_plaintext_p50`` is its p50 over
   the plaintext arm's), and the direct call; p50 and p99 for a 1024x1024 PNG and for pydicom-data's
   RG1_UNCI.dcm, with the gateway's own stage timings.
2. Throughput of the gateway (plaintext, as in earlier runs) with 1 and 2 worker processes at 1, 4 and
   16 concurrent clients (each its own connection, so SO_REUSEPORT spreads them over the workers).

The secure arm runs on throwaway development credentials in a temporary folder, never var/credentials.

Results go to ``bench/results/gateway.json``. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import stack_security
from clients import connect
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.imaging.limits import IngestLimits
from services.imaging.prepare import prepare
from services.security.credentials import DevCredentials
from services.security.identity import Role
from services.settings import load_settings
from services.triton.embedded import EmbeddedTriton

ROOT = Path(__file__).resolve().parent.parent

VERBOSE = os.environ.get("MEDGATE_BENCH_VERBOSE", "") not in {"", "0"}  # the gateways' logs on our stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
        "n": len(samples),
    }


@dataclasses.dataclass(frozen=True)
class Security:
    """Throwaway credentials, and whether an arm uses them (TLS and the inference token) or plaintext."""

    credentials: DevCredentials
    audit_dir: Path
    secure: bool = False

    def env(self) -> dict[str, str]:
        return stack_security.server_env(self.credentials, secure=self.secure, audit_dir=self.audit_dir)

    def client(self) -> connect.ClientSecurity:
        return stack_security.client(self.credentials, Role.INFERENCE, secure=self.secure)


@contextlib.contextmanager
def gateway_process(
    triton_url: str, port: int, workers: int, security: Security, *, shared_memory: str = "auto"
) -> Iterator[None]:
    # Review routing off: this measures inference overhead. Metrics on a free port, to never clash.
    env = dict(
        os.environ,
        **security.env(),
        MEDGATE_TRITON_URL=triton_url,
        MEDGATE_TRITON_SHARED_MEMORY=shared_memory,
        MEDGATE_REVIEW_ENABLED="false",
        MEDGATE_REPORT_ENABLED="false",
        MEDGATE_DICOM_ENABLED="false",  # no DICOM node here: it would want port 11112 beside a running stack
        MEDGATE_GATEWAY_METRICS_PORT="0",
        MEDGATE_GATEWAY_HTTP_PORT="0",  # each gateway's HTTP face on a free port (several run at once here)
    )
    script = Path(sys.executable).parent / "medgate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]  # not pip-installed
    process = subprocess.Popen(
        [*command, "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=None if VERBOSE else subprocess.DEVNULL,
        stderr=None if VERBOSE else subprocess.DEVNULL,
    )
    try:
        with connect.channel(f"127.0.0.1:{port}", security.client()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(grpc.RpcError):
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the gateway did not start")
                time.sleep(0.2)
        time.sleep(1.0 if workers > 1 else 0.2)  # let every worker bind
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def channel(target: str, security: Security, index: int = 0) -> grpc.Channel:
    # A local subchannel pool gives each client its own TCP connection, so SO_REUSEPORT can spread them.
    return connect.channel(
        target,
        security.client(),
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.use_local_subchannel_pool", 1),
            ("medgate.bench.client", index),
        ],
    )


def overhead(
    name: str,
    data: bytes,
    gateways: dict[str, tuple[str, Security]],
    triton_url: str,
    *,
    calls: int,
    warmup: int,
) -> dict[str, Any]:
    """Interleave one call of each arm per round (rotating the order) and compare their percentiles."""
    prepared = prepare(data, limits=IngestLimits())
    tensor = prepared.model_image[None]
    triton = triton_grpc.InferenceServerClient(triton_url)
    image = triton_grpc.InferInput("image", list(tensor.shape), "UINT8")
    image.set_data_from_numpy(tensor)
    request = pb.ClassifyRequest(image=pb.ImageInput(data=data))
    direct_probabilities = triton.infer("classifier", [image]).as_numpy("probabilities")[0]
    channels = {arm: channel(target, security) for arm, (target, security) in gateways.items()}
    stubs = {arm: pb_grpc.InferenceStub(ch) for arm, ch in channels.items()}
    for stub in stubs.values():
        answer = stub.Classify(request)
        top = max(s.score for s in answer.scores)
        assert abs(top - float(direct_probabilities.max())) < 1e-4, "gateway and direct disagree"
    arms = [*stubs, "direct_triton"]
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    stages: dict[str, list[pb.StageTimings]] = {arm: [] for arm in stubs}
    for index in range(warmup + calls):
        for arm in arms[index % len(arms) :] + arms[: index % len(arms)]:
            started = time.perf_counter()
            if arm == "direct_triton":
                triton.infer("classifier", [image])
            else:
                response = stubs[arm].Classify(request)
            elapsed = time.perf_counter() - started
            if index >= warmup:
                samples[arm].append(elapsed)
                if arm != "direct_triton":
                    stages[arm].append(response.timings)
    triton.close()
    for ch in channels.values():
        ch.close()
    stats = {arm: percentiles(values) for arm, values in samples.items()}
    direct = stats["direct_triton"]
    result: dict[str, Any] = {
        "input": name,
        "input_bytes": len(data),
        "original_size": [prepared.transform.original_width, prepared.transform.original_height],
        **stats,
    }
    for arm in stubs:
        stage_p50 = {
            stage: round(float(np.median([getattr(t, stage) for t in stages[arm]])), 3)
            for stage in ("decode_ms", "preprocess_ms", "triton_ms", "encode_ms", "total_ms")
        }
        result[arm]["ratio_p50"] = round(stats[arm]["p50_ms"] / direct["p50_ms"], 3)
        result[arm]["ratio_p99"] = round(stats[arm]["p99_ms"] / direct["p99_ms"], 3)
        # What the gateway adds besides decoding the file (which the direct call never does).
        result[arm]["ratio_p50_without_decode"] = round(
            (stats[arm]["p50_ms"] - stage_p50["decode_ms"]) / direct["p50_ms"], 3
        )
        result[arm]["stage_p50_ms"] = stage_p50
    if "gateway_tls_token" in stats and "gateway" in stats:
        # What TLS and a verified token add to a call, the two arms interleaved in one run (issue 12: <= 1.05).
        result["tls_token_over_plaintext_p50"] = round(
            stats["gateway_tls_token"]["p50_ms"] / stats["gateway"]["p50_ms"], 3
        )
    return result


def throughput(
    target: str, security: Security, request: pb.ClassifyRequest, *, clients: int, seconds: float
) -> dict[str, Any]:
    counts = [0] * clients
    errors = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop_at = time.monotonic() + seconds
    start = threading.Barrier(clients)

    def run(index: int) -> None:
        with channel(target, security, index) as ch:
            stub = pb_grpc.InferenceStub(ch)
            stub.Classify(request)  # connect and warm up before the clock starts
            start.wait()
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                try:
                    stub.Classify(request, timeout=30)
                    counts[index] += 1
                    latencies[index].append(time.perf_counter() - began)
                except grpc.RpcError:
                    errors[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    merged = [x for row in latencies for x in row]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": sum(counts),
        "errors": sum(errors),
        "rps": round(sum(counts) / seconds, 2),
        "latency": percentiles(merged) if merged else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dicom", type=Path, help="RG1_UNCI.dcm from elsewhere (default: pydicom-data's copy)")
    parser.add_argument("--triton-url", default="", help="use this Triton (host:port) instead of starting one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = parser.parse_args(argv)

    import cv2
    from pydicom.data import get_testdata_file

    from training.phantoms import generate, model_space

    png = cv2.imencode(".png", model_space(generate(np.random.default_rng(4242)))["image"])[1].tobytes()
    dicom = (args.dicom or Path(str(get_testdata_file("RG1_UNCI.dcm")))).read_bytes()

    settings = load_settings()
    triton_settings = dataclasses.replace(
        settings.triton, url="", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"calls": args.calls, "warmup": args.warmup, "seconds": args.seconds, "clients": args.clients},
    }
    with contextlib.ExitStack() as stack:
        url = args.triton_url or stack.enter_context(EmbeddedTriton(triton_settings)).settings.grpc_url
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medgate-bench-")))
        plain = Security(stack_security.make_credentials(scratch / "credentials"), scratch / "audit")
        secure = dataclasses.replace(plain, secure=True)
        arms = {"gateway": plain, "gateway_wire": plain, "gateway_tls_token": secure}
        ports = {arm: free_port() for arm in arms}
        with (
            gateway_process(url, ports["gateway"], 1, plain),
            gateway_process(url, ports["gateway_wire"], 1, plain, shared_memory="off"),
            gateway_process(url, ports["gateway_tls_token"], 1, secure),
        ):
            targets = {arm: (f"127.0.0.1:{port}", arms[arm]) for arm, port in ports.items()}
            results["overhead"] = [
                overhead("png_1024", png, targets, url, calls=args.calls, warmup=args.warmup),
                overhead("RG1_UNCI.dcm", dicom, targets, url, calls=args.calls // 2, warmup=args.warmup // 2),
            ]
        request = pb.ClassifyRequest(image=pb.ImageInput(data=png))
        port = free_port()
        target = f"127.0.0.1:{port}"
        sweeps: dict[str, Any] = {}
        for workers in (1, 2):
            with gateway_process(url, port, workers, plain):
                for clients in args.clients:
                    point = throughput(target, plain, request, clients=clients, seconds=args.seconds)
                    sweeps[f"workers_{workers}_clients_{clients}"] = point
                    print(f"workers {workers} clients {clients}: {point['rps']} rps", flush=True)
        sweeps["scaling_2_over_1"] = {
            f"clients_{c}": round(
                sweeps[f"workers_2_clients_{c}"]["rps"] / max(sweeps[f"workers_1_clients_{c}"]["rps"], 1e-9), 3
            )
            for c in args.clients
        }
        results["throughput_png_1024"] = sweeps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
