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
3. Transport (``transport``): one unary call carrying RG1_UNCI.dcm's 7.2 MB over loopback to a bare gRPC server
   process, with gRPC's defaults and with candidate HTTP/2 settings (frame size, stream window, BDP probe off,
   TCP read chunks) on both ends, arms interleaved: what the settings of services/rpc/server.py were chosen by.
4. Heavy/light mix (``mix``, issue 15 items 3 and 6): Classify on a 1024x1024 PNG at concurrency 4, alone and
   beside one client looping a 16-box Segment on RG1_UNCI.dcm (16 encoder passes); p50/p99 of each and the p99
   ratio (target <= 2). ``--box-nice N`` runs it on a copy of the model repository whose box model runs at nice N
   (0: as before issue 15), for the side-by-side comparison.

5. ``floor`` and ``direct16`` (issue 15 item 6, in ``bench/bench_floor.py``): Classify p50 from the Python client and
   ghz (when on PATH) against the sum of in-process stage floors measured in the same run; the gateway against the
   classifier called directly at 16 clients.

``--sections`` picks some of overhead, throughput, transport, mix, floor, direct16 (default: all).

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
    triton_url: str,
    port: int,
    workers: int,
    security: Security,
    *,
    shared_memory: str = "auto",
    extra_env: dict[str, str] | None = None,
) -> Iterator[int]:
    """A ``medgate serve`` process until the block ends; yields its pid (with one worker, the process that serves)."""
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
        **(extra_env or {}),
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
        yield process.pid
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


# --- transport: HTTP/2 settings for large messages -----------------------------------------------------------------

_BIG = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
TRANSPORT_ARMS: dict[str, list[tuple[str, Any]]] = {
    "grpc_defaults": [],
    "frame_16m": [("grpc.http2.max_frame_size", (16 << 20) - 1)],
    "window_8m": [("grpc.http2.lookahead_bytes", 8 << 20)],
    "bdp_off_window_8m": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 << 20)],
    "tcp_read_4m": [
        ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
        ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
    ],
}


def serve_transport(options_json: str, port: int) -> None:
    """A bare grpc.aio server answering the length of what it got (``--serve-transport``, a child process)."""
    import asyncio

    options = [tuple(o) for o in json.loads(options_json)]

    async def run() -> None:
        server = grpc.aio.server(options=_BIG + options)

        async def echo(request: bytes, context: Any) -> bytes:
            return len(request).to_bytes(8, "little")

        handler = grpc.method_handlers_generic_handler(
            "bench.Transport", {"Send": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def transport(data: bytes, *, calls: int, warmup: int) -> dict[str, Any]:
    """Each arm's settings on a server process and its client channel; one call of each arm per round."""
    processes, stubs, channels = [], {}, []
    try:
        for arm, options in TRANSPORT_ARMS.items():
            port = free_port()
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.bench_gateway", "--serve-transport", json.dumps(options), str(port)]
                )
            )
            ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=_BIG + options)
            grpc.channel_ready_future(ch).result(timeout=60)
            channels.append(ch)
            stubs[arm] = ch.unary_unary("/bench.Transport/Send")
        arms = list(stubs)
        samples: dict[str, list[float]] = {arm: [] for arm in arms}
        for index in range(warmup + calls):
            for arm in arms[index % len(arms) :] + arms[: index % len(arms)]:
                started = time.perf_counter()
                stubs[arm](data, timeout=30)
                if index >= warmup:
                    samples[arm].append(time.perf_counter() - started)
    finally:
        for ch in channels:
            ch.close()
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
    stats: dict[str, Any] = {arm: percentiles(values) for arm, values in samples.items()}
    base = stats["grpc_defaults"]["p50_ms"]
    for arm in arms:
        stats[arm]["p50_over_defaults"] = round(stats[arm]["p50_ms"] / base, 3)
    return {"input_bytes": len(data), "options": {a: dict(o) for a, o in TRANSPORT_ARMS.items()}, **stats}


# --- heavy/light mix ------------------------------------------------------------------------------------------------


def heavy_boxes() -> list[pb.Box]:
    """16 boxes of 100 px, 300 px apart, over RG1_UNCI.dcm: each its own window (16 encoder passes)."""
    return [
        pb.Box(x0=300 + (i % 4) * 300, y0=300 + (i // 4) * 300, x1=400 + (i % 4) * 300, y1=400 + (i // 4) * 300)
        for i in range(16)
    ]


def mix(
    target: str, security: Security, light: pb.ClassifyRequest, heavy: pb.SegmentRequest, *, seconds: float
) -> dict[str, Any]:
    """Classify at concurrency 4 alone, then beside one client looping the heavy Segment."""
    alone = throughput(target, security, light, clients=4, seconds=seconds)
    heavy_times: list[float] = []
    heavy_errors: list[str] = []
    stop = threading.Event()
    first = threading.Event()

    def loop() -> None:
        with channel(target, security, 99) as ch:
            stub = pb_grpc.InferenceStub(ch)
            while not stop.is_set():
                began = time.perf_counter()
                call = stub.Segment.future(heavy, timeout=600)
                first.set()
                try:
                    call.result()
                    heavy_times.append(time.perf_counter() - began)
                except grpc.RpcError as exc:
                    heavy_errors.append(exc.code().name)
                    if stop.is_set():
                        break

    thread = threading.Thread(target=loop)
    thread.start()
    first.wait(60)
    time.sleep(1.0)  # the heavy call is inside the box model now
    loaded = throughput(target, security, light, clients=4, seconds=seconds)
    stop.set()
    thread.join()
    ratio = loaded["latency"]["p99_ms"] / max(alone["latency"]["p99_ms"], 1e-9)
    return {
        "classify_alone": alone,
        "classify_beside_heavy": loaded,
        "classify_p99_ratio": round(ratio, 3),
        "classify_p50_ratio": round(loaded["latency"]["p50_ms"] / max(alone["latency"]["p50_ms"], 1e-9), 3),
        "heavy_segments_done": len(heavy_times),
        "heavy_segment_mean_s": round(float(np.mean(heavy_times)), 2) if heavy_times else None,
        "heavy_errors": sorted(set(heavy_errors)),
    }


@contextlib.contextmanager
def repository_with_box_nice(nice: int) -> Iterator[Path]:
    """A copy of triton_models (models symlinked) whose box model's config says ``nice`` (for side by side)."""
    source = ROOT / "triton_models"
    with tempfile.TemporaryDirectory(prefix="medgate-bench-models-") as scratch:
        copy = Path(scratch)
        for entry in source.iterdir():
            if entry.is_dir() and entry.name != "segmenter_box" and not entry.name.startswith("__"):
                (copy / entry.name).symlink_to(entry)
        box = copy / "segmenter_box"
        box.mkdir()
        (box / "1").symlink_to(source / "segmenter_box" / "1")
        config = (source / "segmenter_box" / "config.pbtxt").read_text()
        marker = 'key: "nice"\n  value: { string_value: "'
        head, _, rest = config.partition(marker)
        if not rest:
            raise RuntimeError("segmenter_box/config.pbtxt has no nice parameter")
        (box / "config.pbtxt").write_text(head + marker + str(nice) + rest[rest.index('"') :])
        yield copy


SECTIONS = ("overhead", "throughput", "transport", "mix", "floor", "direct16")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--serve-transport":
        serve_transport(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dicom", type=Path, help="RG1_UNCI.dcm from elsewhere (default: pydicom-data's copy)")
    parser.add_argument("--triton-url", default="", help="use this Triton (host:port) instead of starting one")
    parser.add_argument(
        "--triton-pid", type=int, help="with --triton-url: its server's pid (direct16 counts its process group's CPU)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--mix-seconds", type=float, default=30.0, help="each half of the heavy/light mix")
    parser.add_argument("--box-nice", type=int, help="mix: run the box model at this nice level (a repository copy)")
    parser.add_argument("--direct-seconds", type=float, default=5.0, help="direct16: each arm's window per round")
    parser.add_argument("--direct-rounds", type=int, default=3, help="direct16: rounds of alternating windows")
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
    sections = set(args.sections)
    if "transport" in sections:
        results["transport_rg1_unci"] = transport(dicom, calls=args.calls, warmup=args.warmup)
        print(json.dumps(results["transport_rg1_unci"], indent=2), flush=True)
    with contextlib.ExitStack() as stack:
        if args.box_nice is not None:
            repository = stack.enter_context(repository_with_box_nice(args.box_nice))
            triton_settings = dataclasses.replace(triton_settings, model_repository=repository)
            results["box_nice"] = args.box_nice
        needs_triton = sections & {"overhead", "throughput", "mix", "floor", "direct16"}
        url = ""
        if needs_triton and args.triton_url:
            url = args.triton_url
        elif needs_triton:
            embedded = stack.enter_context(EmbeddedTriton(triton_settings))
            url, args.triton_pid = embedded.settings.grpc_url, embedded.pid
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medgate-bench-")))
        plain = Security(stack_security.make_credentials(scratch / "credentials"), scratch / "audit")
        secure = dataclasses.replace(plain, secure=True)
        if "overhead" in sections:
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
        if "throughput" in sections:
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
        if "mix" in sections:
            heavy = pb.SegmentRequest(image=pb.ImageInput(data=dicom), boxes=heavy_boxes())
            with gateway_process(url, port, 1, plain):
                results["heavy_light_mix"] = mix(target, plain, request, heavy, seconds=args.mix_seconds)
            print(json.dumps(results["heavy_light_mix"], indent=2), flush=True)
        if sections & {"floor", "direct16"}:
            from bench import bench_floor

            results.update(bench_floor.run_sections(sections, url, target, plain, png, dicom, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if set(args.sections) != set(SECTIONS) and args.out.exists():
        # Some sections only: the other sections' results of an earlier run stay in the file.
        results = {**json.loads(args.out.read_text()), **results}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
