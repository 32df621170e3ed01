"""POST /score (MedImageParse's JSON) against gRPC Segment on the same image, the same gateway, in one run.

One ``medgate serve`` process as ``make run`` serves it (TLS, bearer tokens, audit; throwaway credentials
from bench/stack_security.py) on an embedded Triton, review routing and the DICOM node off. Each arm
is what a client pays end to end, its own encoding and decoding included:

- ``grpc_segment``: ``SegmentRequest`` with the image's bytes, the answer's masks as ``np.frombuffer``;
- ``http_score``: seed 002's body (``base64.encodebytes``, ``json.dumps``), ``POST /score``, then seed
  002's decoding (``json.loads``, ``json.loads(image_features)``, ``base64.b64decode``, ``np.frombuffer``);
- ``http_v1_segment``: the same ``SegmentRequest`` in protobuf's JSON mapping, ``POST /v1/segment``.

Latency: one call of each arm per round, the order rotating, sequential on one connection each
(keep-alive for HTTP). Throughput: ``--clients`` threads per arm for ``--seconds``, each its own
connection. Ratios are HTTP over gRPC. ``python -m bench.bench_http``; results in bench/results/http.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import stack_security
from bench.bench_gateway import VERBOSE, free_port, percentiles
from clients import connect
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.security.credentials import DevCredentials
from services.security.identity import Role
from services.settings import load_settings
from services.triton.embedded import EmbeddedTriton

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = "left lung & right lung & heart"


@dataclasses.dataclass(frozen=True)
class Stack:
    grpc_port: int
    http_port: int
    credentials: DevCredentials

    @property
    def token(self) -> str:
        return self.credentials.token(Role.INFERENCE)


@contextlib.contextmanager
def gateway_process(triton_url: str, credentials: DevCredentials, audit_dir: Path, workers: int) -> Iterator[Stack]:
    stack = Stack(free_port(), free_port(), credentials)
    env = dict(
        os.environ,
        **stack_security.server_env(credentials, secure=True, audit_dir=audit_dir),
        MEDGATE_TRITON_URL=triton_url,
        MEDGATE_REVIEW_ENABLED="false",
        MEDGATE_REPORT_ENABLED="false",
        MEDGATE_DICOM_ENABLED="false",
        MEDGATE_GATEWAY_METRICS_PORT="0",
        MEDGATE_GATEWAY_HTTP_PORT=str(stack.http_port),
    )
    script = Path(sys.executable).parent / "medgate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]
    process = subprocess.Popen(
        [*command, "serve", "--port", str(stack.grpc_port), "--workers", str(workers)],
        env=env,
        stdout=None if VERBOSE else subprocess.DEVNULL,
        stderr=None if VERBOSE else subprocess.DEVNULL,
    )
    try:
        security = stack_security.client(credentials, Role.INFERENCE, secure=True)
        with connect.channel(f"127.0.0.1:{stack.grpc_port}", security) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(grpc.RpcError):
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the gateway did not start (MEDGATE_BENCH_VERBOSE=1 shows its log)")
                time.sleep(0.2)
        time.sleep(1.0 if workers > 1 else 0.3)
        yield stack
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


class GrpcArm:
    def __init__(self, stack: Stack, image: bytes) -> None:
        security = stack_security.client(stack.credentials, Role.INFERENCE, secure=True)
        self.channel = connect.channel(
            f"127.0.0.1:{stack.grpc_port}",
            security,
            [
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.image = image

    def __call__(self) -> np.ndarray:
        answer = self.stub.Segment(pb.SegmentRequest(image=pb.ImageInput(data=self.image), prompts=PROMPTS), timeout=60)
        features = answer.image_features
        return np.frombuffer(features.data, dtype=features.dtype).reshape(list(features.shape))

    def close(self) -> None:
        self.channel.close()


class HttpArm:
    """One keep-alive HTTPS connection; ``route`` is /score (seed 002's body) or /v1/segment (the JSON mapping)."""

    def __init__(self, stack: Stack, image: bytes, route: str) -> None:
        self.context = ssl.create_default_context(cafile=str(stack.credentials.ca_cert))
        self.port = stack.http_port
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.token}"}
        self.image = image
        self.route = route
        self.connection = self._connect()
        self.client_s: list[float] = []  # per call: this client's JSON and base64 work (encode + decode)

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("localhost", self.port, timeout=60, context=self.context)

    def _body(self) -> bytes:
        if self.route == "/score":
            encoded = base64.encodebytes(self.image).decode("utf-8")
            body: Any = {"input_data": {"columns": ["image", "text"], "index": [0], "data": [[encoded, PROMPTS]]}}
        else:
            body = {"image": {"data": base64.b64encode(self.image).decode("ascii")}, "prompts": PROMPTS}
        return json.dumps(body).encode()

    def __call__(self) -> np.ndarray:
        began = time.perf_counter()
        body = self._body()
        encoding = time.perf_counter() - began
        for attempt in (0, 1):
            try:
                self.connection.request("POST", self.route, body=body, headers=self.headers)
                response = self.connection.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, ConnectionError):  # a keep-alive connection the server closed
                self.connection.close()
                self.connection = self._connect()
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"{self.route}: HTTP {response.status}: {raw[:300]!r}")
        began = time.perf_counter()
        answer = json.loads(raw)
        # /score: seed 002's decoding (image_features is a JSON string); /v1/segment: the JSON mapping's object.
        features = json.loads(answer[0]["image_features"]) if self.route == "/score" else answer["image_features"]
        data = base64.b64decode(features["data"])
        masks = np.frombuffer(data, dtype=np.dtype(features["dtype"])).reshape(features["shape"])
        self.client_s.append(encoding + time.perf_counter() - began)
        return masks

    def close(self) -> None:
        self.connection.close()


ARMS: dict[str, Callable[[Stack, bytes], GrpcArm | HttpArm]] = {
    "grpc_segment": GrpcArm,
    "http_score": lambda stack, image: HttpArm(stack, image, "/score"),
    "http_v1_segment": lambda stack, image: HttpArm(stack, image, "/v1/segment"),
}


def latency(stack: Stack, name: str, image: bytes, *, calls: int, warmup: int) -> dict[str, Any]:
    arms = {name: make(stack, image) for name, make in ARMS.items()}
    reference = arms["grpc_segment"]()
    for arm_name, client in arms.items():
        assert np.array_equal(client(), reference), f"{arm_name} and gRPC disagree"
    names = list(arms)
    samples: dict[str, list[float]] = {arm: [] for arm in names}
    for index in range(warmup + calls):
        for arm in names[index % len(names) :] + names[: index % len(names)]:
            began = time.perf_counter()
            arms[arm]()
            if index >= warmup:
                samples[arm].append(time.perf_counter() - began)
    client_p50 = {
        arm: round(float(np.median(client.client_s[-calls:])) * 1000, 3)
        for arm, client in arms.items()
        if isinstance(client, HttpArm)
    }
    for client in arms.values():
        client.close()
    stats = {arm: percentiles(values) for arm, values in samples.items()}
    grpc_p50 = stats["grpc_segment"]["p50_ms"]
    result: dict[str, Any] = {
        "input": name,
        "input_bytes": len(image),
        "masks_bytes": int(reference.nbytes),
        "answer_json_bytes_score": len(json.dumps(base64.b64encode(reference.tobytes()).decode())),
        **stats,
    }
    for arm in ("http_score", "http_v1_segment"):
        result[f"{arm}_over_grpc_p50"] = round(stats[arm]["p50_ms"] / grpc_p50, 3)
        result[f"{arm}_added_p50_ms"] = round(stats[arm]["p50_ms"] - grpc_p50, 3)
        # What the client's own JSON and base64 work (stdlib, as seed 002's code does it) is of that.
        result[f"{arm}_client_json_base64_p50_ms"] = client_p50[arm]
    return result


def window(stack: Stack, image: bytes, arm_name: str, *, clients: int, seconds: float) -> tuple[int, int, list[float]]:
    """``clients`` threads calling one arm for ``seconds``: (answers, errors, latencies)."""
    counts = [0] * clients
    errors = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)
    stop_at = [0.0]

    def run(index: int) -> None:
        arm = ARMS[arm_name](stack, image)
        try:
            arm()  # connect and warm up before the clock starts
            if start.wait() == 0:
                stop_at[0] = time.monotonic() + seconds
            while not stop_at[0]:
                time.sleep(0.001)
            while time.monotonic() < stop_at[0]:
                began = time.perf_counter()
                try:
                    arm()
                    counts[index] += 1
                    latencies[index].append(time.perf_counter() - began)
                except (grpc.RpcError, RuntimeError, OSError):
                    errors[index] += 1
        finally:
            arm.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), sum(errors), [x for row in latencies for x in row]


def throughput(stack: Stack, image: bytes, *, clients: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Every arm for ``seconds`` in all, in ``rounds`` windows taken in turn, so a shared machine's load drifts
    over all arms alike rather than over whichever ran last."""
    answers = dict.fromkeys(ARMS, 0)
    errors = dict.fromkeys(ARMS, 0)
    latencies: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm in ARMS:
            done, failed, times = window(stack, image, arm, clients=clients, seconds=seconds / rounds)
            answers[arm] += done
            errors[arm] += failed
            latencies[arm] += times
    runs: dict[str, Any] = {
        arm: {
            "clients": clients,
            "requests": answers[arm],
            "errors": errors[arm],
            "rps": round(answers[arm] / seconds, 2),
            "latency": percentiles(latencies[arm]) if latencies[arm] else {},
        }
        for arm in ARMS
    }
    for arm in ("http_score", "http_v1_segment"):
        runs[f"{arm}_over_grpc_rps"] = round(runs[arm]["rps"] / runs["grpc_segment"]["rps"], 3)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="throughput windows per arm, taken in turn")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--triton-url", default="", help="use this Triton (host:port) instead of starting one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http.json")
    args = parser.parse_args(argv)

    import cv2
    from pydicom.data import get_testdata_file

    from training.phantoms import generate, model_space

    # What a MedImageParse client sends: a 1024x1024 8-bit PNG (the letterboxing already done); and a real DICOM.
    png = cv2.imencode(".png", model_space(generate(np.random.default_rng(4242)))["image"])[1].tobytes()
    dicom = Path(str(get_testdata_file("RG1_UNCI.dcm"))).read_bytes()
    settings = load_settings()
    triton_settings = dataclasses.replace(
        settings.triton, url="", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": vars(args) | {"out": str(args.out), "prompts": PROMPTS},
    }
    with contextlib.ExitStack() as stack:
        url = args.triton_url or stack.enter_context(EmbeddedTriton(triton_settings)).settings.grpc_url
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medgate-bench-http-")))
        credentials = stack_security.make_credentials(scratch / "credentials")
        served = stack.enter_context(gateway_process(url, credentials, scratch / "audit", args.workers))
        results["latency"] = [
            latency(served, "phantom_1024.png", png, calls=args.calls, warmup=args.warmup),
            latency(served, "RG1_UNCI.dcm", dicom, calls=args.calls // 2, warmup=args.warmup),
        ]
        for point in results["latency"]:
            print(
                f"{point['input']}: gRPC p50 {point['grpc_segment']['p50_ms']} ms, /score p50 "
                f"{point['http_score']['p50_ms']} ms ({point['http_score_over_grpc_p50']}x)",
                flush=True,
            )
        results["throughput_phantom_1024_png"] = throughput(
            served, png, clients=args.clients, seconds=args.seconds, rounds=args.rounds
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
