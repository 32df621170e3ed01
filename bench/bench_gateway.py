"""Gateway overhead and throughput, measured side by side in one run (``make bench``).

1. Overhead ratio: gateway ``Classify`` on an encoded file against a direct tritonclient call of the
   same model on the same preprocessed tensor, calls interleaved A/B so machine noise hits both;
   p50 and p99 for a 1024x1024 PNG and for pydicom-data's RG1_UNCI.dcm.
2. Throughput of the gateway with 1 and 2 worker processes (clients on separate connections).

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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medgate.v1 import inference_pb2 as pb  # noqa: E402
from medgate.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from services.imaging.limits import IngestLimits  # noqa: E402
from services.imaging.prepare import prepare  # noqa: E402
from services.settings import load_settings  # noqa: E402
from services.triton.embedded import EmbeddedTriton  # noqa: E402


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


@contextlib.contextmanager
def gateway_process(triton_url: str, port: int, workers: int) -> Iterator[None]:
    # Review routing off: this measures inference overhead. Metrics on a free port, to never clash.
    env = dict(
        os.environ, MEDGATE_TRITON_URL=triton_url, MEDGATE_REVIEW_ENABLED="false", MEDGATE_GATEWAY_METRICS_PORT="0"
    )
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgate"), "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
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


def channel(target: str, index: int = 0) -> grpc.Channel:
    # A local subchannel pool gives each client its own TCP connection, so SO_REUSEPORT can spread them.
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.use_local_subchannel_pool", 1),
            ("medgate.bench.client", index),
        ],
    )


def overhead(name: str, data: bytes, gateway: str, triton_url: str, *, calls: int, warmup: int) -> dict[str, Any]:
    prepared = prepare(data, limits=IngestLimits())
    tensor = prepared.model_image[None]
    triton = triton_grpc.InferenceServerClient(triton_url)
    image = triton_grpc.InferInput("image", list(tensor.shape), "UINT8")
    image.set_data_from_numpy(tensor)
    request = pb.ClassifyRequest(image=pb.ImageInput(data=data))
    direct_probabilities = triton.infer("classifier", [image]).as_numpy("probabilities")[0]
    with channel(gateway) as ch:
        stub = pb_grpc.InferenceStub(ch)
        answer = stub.Classify(request)
        labels = {s.label: s.score for s in answer.scores}
        assert abs(max(labels.values()) - float(direct_probabilities.max())) < 1e-4, "gateway and direct disagree"
        via_gateway: list[float] = []
        direct: list[float] = []
        stages: list[pb.StageTimings] = []
        for index in range(warmup + calls):
            first, second = (0, 1) if index % 2 == 0 else (1, 0)
            for which in (first, second):
                started = time.perf_counter()
                if which == 0:
                    response = stub.Classify(request)
                else:
                    triton.infer("classifier", [image])
                elapsed = time.perf_counter() - started
                if index >= warmup:
                    (via_gateway if which == 0 else direct).append(elapsed)
                    if which == 0:
                        stages.append(response.timings)
    triton.close()
    gateway_stats = percentiles(via_gateway)
    direct_stats = percentiles(direct)
    return {
        "input": name,
        "input_bytes": len(data),
        "original_size": [prepared.transform.original_width, prepared.transform.original_height],
        "gateway": gateway_stats,
        "direct_triton": direct_stats,
        "ratio_p50": round(gateway_stats["p50_ms"] / direct_stats["p50_ms"], 3),
        "ratio_p99": round(gateway_stats["p99_ms"] / direct_stats["p99_ms"], 3),
        "gateway_stage_p50_ms": {
            stage: round(float(np.median([getattr(t, stage) for t in stages])), 3)
            for stage in ("decode_ms", "preprocess_ms", "triton_ms", "encode_ms", "total_ms")
        },
    }


def throughput(target: str, request: pb.ClassifyRequest, *, clients: int, seconds: float) -> dict[str, Any]:
    counts = [0] * clients
    errors = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop_at = time.monotonic() + seconds
    start = threading.Barrier(clients)

    def run(index: int) -> None:
        with channel(target, index) as ch:
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
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = parser.parse_args(argv)

    import cv2
    from pydicom.data import get_testdata_file

    from training.phantoms import generate, model_space

    png = cv2.imencode(".png", model_space(generate(np.random.default_rng(4242)))["image"])[1].tobytes()
    dicom = Path(str(get_testdata_file("RG1_UNCI.dcm"))).read_bytes()

    settings = load_settings()
    triton_settings = dataclasses.replace(
        settings.triton, url="", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with EmbeddedTriton(triton_settings) as triton:
        url = triton.settings.grpc_url
        port = free_port()
        target = f"127.0.0.1:{port}"
        with gateway_process(url, port, workers=1):
            results["overhead"] = [
                overhead("png_1024", png, target, url, calls=args.calls, warmup=args.warmup),
                overhead("RG1_UNCI.dcm", dicom, target, url, calls=args.calls // 2, warmup=args.warmup // 2),
            ]
        request = pb.ClassifyRequest(image=pb.ImageInput(data=png))
        sweeps: dict[str, Any] = {}
        for workers in (1, 2):
            with gateway_process(url, port, workers=workers):
                sweeps[f"workers_{workers}"] = throughput(target, request, clients=args.clients, seconds=args.seconds)
        sweeps["scaling_2_over_1"] = round(sweeps["workers_2"]["rps"] / max(sweeps["workers_1"]["rps"], 1e-9), 3)
        results["throughput_png_1024"] = sweeps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
