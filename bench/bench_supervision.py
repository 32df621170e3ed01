"""Triton under supervision and routing off the caller's path (``python -m bench.bench_supervision``).

A benchmark, not a test; results in ``bench/results/supervision.json``.

Recovery: ``medgate serve`` as ``make run`` serves it (TLS and tokens on throwaway credentials, the embedded
Triton under its supervisor). ``--kills`` times, the real tritonserver is killed with SIGKILL while a client
keeps calling Classify: reported are the seconds until health says NOT_SERVING, the latency of the calls
answered UNAVAILABLE meanwhile (p50, max), the seconds until SERVING again and until the first answer, and
whether anything of the killed server was left (live processes of its group, its /dev/shm regions). Then
the same for a hang (SIGSTOP for ``--hang`` s, then SIGCONT): NOT_SERVING after, SERVING again after.

Routing: one embedded Triton, two ``medgate serve`` gateways on it: one routes every classification to its
own review service (a 100% sampling flow), one routes nothing. The same distinct inputs (a 1024x1024 PNG
radiograph, and RG1_UNCI.dcm with one pixel changed per call so each is a new case) go to both, interleaved;
reported per input: Classify p50/p99 on each side, the ratio of the p50s, the route stage's p50, and how far
the stage timings are from their total; and the machine's load averages when the routing part started and ended.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import stack_security
from bench.bench_gateway import Security, free_port, percentiles
from clients import connect
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.settings import load_settings
from services.triton.embedded import SHM_PREFIX, EmbeddedTriton, group_members

ROOT = Path(__file__).resolve().parent.parent
VERBOSE = bool(os.environ.get("MEDGATE_BENCH_VERBOSE"))
SERVING = health_pb2.HealthCheckResponse.SERVING

FLOWS = """
[[flows]]
name = "bench-always"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 600
output_dir = "out"
activation_conditions = '''
{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}
'''
"""


@contextlib.contextmanager
def serve(port: int, security: Security, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``medgate serve`` with ``env`` on ``port`` until SERVING; SIGTERM on the way out."""
    script = Path(sys.executable).parent / "medgate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]
    full_env = dict(
        os.environ,
        **security.env(),
        MEDGATE_DICOM_ENABLED="false",
        MEDGATE_REPORT_ENABLED="false",
        MEDGATE_GATEWAY_METRICS_PORT="0",
        MEDGATE_GATEWAY_HTTP_PORT="0",
        **env,
    )
    process = subprocess.Popen(
        [*command, "serve", "--port", str(port)],
        env=full_env,
        stdout=None if VERBOSE else subprocess.DEVNULL,
        stderr=None if VERBOSE else subprocess.DEVNULL,
    )
    try:
        with connect.channel(f"127.0.0.1:{port}", security.client()) as channel:
            wait_health(channel, SERVING, 300, process)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def health(channel: grpc.Channel) -> int:
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return -1
    return int(answer.status)


def wait_health(channel: grpc.Channel, status: int, within_s: float, process: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    while health(channel) != status:
        if process.poll() is not None:
            raise RuntimeError(f"medgate serve exited with status {process.returncode}")
        if time.monotonic() - started > within_s:
            raise RuntimeError(f"health did not turn {status} within {within_s} s")
        time.sleep(0.02)
    return time.monotonic() - started


def tritonserver_pid(http_port: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"tritonserver") and f"--http-port={http_port}".encode() in command:
            return int(entry.name)
    raise RuntimeError(f"no tritonserver with --http-port={http_port}")


def regions_of(serve_pid: int) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}_{serve_pid}_*")}


def outage(
    channel: grpc.Channel, process: subprocess.Popen[bytes], request: pb.ClassifyRequest, kill: Any, recover: Any
) -> dict[str, Any]:
    """``kill()`` Triton, call Classify until health is NOT_SERVING and while it is, ``recover()``, time it all."""
    stub = pb_grpc.InferenceStub(channel)
    stub.Classify(request, timeout=60)
    started = time.monotonic()
    kill()
    not_serving_s: float | None = None
    unavailable: list[float] = []
    other_codes: dict[str, int] = {}
    recovered = False
    while True:
        state = health(channel)
        if state != SERVING and not_serving_s is None:
            not_serving_s = time.monotonic() - started
            recover()
        if not_serving_s is not None and state == SERVING:
            break
        if time.monotonic() - started > 120:
            raise RuntimeError("not SERVING again within 120 s")
        call_started = time.perf_counter()
        try:
            stub.Classify(request, timeout=30)
            if not_serving_s is not None:
                recovered = True
                break
        except grpc.RpcError as exc:
            took = time.perf_counter() - call_started
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                unavailable.append(took)
            else:
                other_codes[exc.code().name] = other_codes.get(exc.code().name, 0) + 1
        time.sleep(0.05)
    serving_s = time.monotonic() - started
    if not recovered:
        stub.Classify(request, timeout=60)
    answered_s = time.monotonic() - started
    return {
        "not_serving_after_s": round(not_serving_s or 0.0, 3),
        "unavailable_calls": len(unavailable),
        "unavailable_p50_ms": round(statistics.median(unavailable) * 1000, 1) if unavailable else None,
        "unavailable_max_ms": round(max(unavailable) * 1000, 1) if unavailable else None,
        "other_codes": other_codes,
        "serving_again_after_s": round(serving_s, 2),
        "first_answer_after_s": round(answered_s, 2),
    }


def recovery(args: argparse.Namespace, security: Security, request: pb.ClassifyRequest) -> dict[str, Any]:
    http_port, port = free_port(), free_port()
    env = {
        "MEDGATE_TRITON_URL": "",
        "MEDGATE_TRITON_HTTP_PORT": str(http_port),
        "MEDGATE_TRITON_GRPC_PORT": str(free_port()),
        "MEDGATE_TRITON_METRICS_PORT": str(free_port()),
        "MEDGATE_REVIEW_ENABLED": "false",
    }
    kills: list[dict[str, Any]] = []
    with serve(port, security, env) as process, connect.channel(f"127.0.0.1:{port}", security.client()) as channel:
        for _ in range(args.kills):
            pid = tritonserver_pid(http_port)
            old_regions = regions_of(process.pid)
            point = outage(channel, process, request, lambda pid=pid: os.kill(pid, signal.SIGKILL), lambda: None)
            point["left_processes"] = len(group_members(pid))
            point["left_regions"] = len(old_regions & regions_of(process.pid))
            kills.append(point)
            print(f"SIGKILL: {point}", flush=True)
        pid = tritonserver_pid(http_port)

        def stop() -> None:
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(args.hang, os.kill, (pid, signal.SIGCONT)).start()

        hang = outage(channel, process, request, stop, lambda: None)
        hang["stopped_s"] = args.hang
        print(f"SIGSTOP {args.hang} s: {hang}", flush=True)
    return {
        "kills": kills,
        "serving_again_after_s_p50": statistics.median(k["serving_again_after_s"] for k in kills),
        "serving_again_after_s_max": max(k["serving_again_after_s"] for k in kills),
        "hang": hang,
    }


def inputs(count: int) -> dict[str, list[bytes]]:
    """Distinct inputs: phantom radiographs as 1024x1024 PNGs; RG1_UNCI.dcm with its last pixel changed."""
    import cv2
    from pydicom.data import get_testdata_file

    from training.phantoms import generate, model_space

    pngs = [
        cv2.imencode(".png", model_space(generate(np.random.default_rng(7000 + i)))["image"])[1].tobytes()
        for i in range(count)
    ]
    dicom = bytearray(Path(str(get_testdata_file("RG1_UNCI.dcm"))).read_bytes())
    dicoms = []
    for i in range(count):
        dicom[-2:] = (i % 4096).to_bytes(2, "little")  # the last pixel (uncompressed 16-bit data runs to the end)
        dicoms.append(bytes(dicom))
    return {"png_1024": pngs, "RG1_UNCI.dcm": dicoms}


def routing(args: argparse.Namespace, security: Security, scratch: Path) -> dict[str, Any]:
    settings = load_settings()
    triton = dataclasses.replace(
        settings.triton, url="", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    flows = scratch / "flows.toml"
    flows.write_text(FLOWS)
    review_port = free_port()
    routed_env = {
        "MEDGATE_REVIEW_ENABLED": "true",
        "MEDGATE_REVIEW_URL": "",
        "MEDGATE_REVIEW_PORT": str(review_port),
        "MEDGATE_REVIEW_WEB_ENABLED": "false",
        "MEDGATE_REVIEW_FLOWS_FILE": str(flows),
        "MEDGATE_REVIEW_STORE_PATH": str(scratch / "review.sqlite3"),
        "MEDGATE_REVIEW_OUTBOX_DIR": str(scratch / "outbox"),
    }
    results: dict[str, Any] = {}
    with EmbeddedTriton(triton):
        common = {"MEDGATE_TRITON_URL": triton.grpc_url}
        routed_port, plain_port = free_port(), free_port()
        with (
            serve(routed_port, security, {**common, **routed_env}),
            serve(plain_port, security, {**common, "MEDGATE_REVIEW_ENABLED": "false"}),
            connect.channel(f"127.0.0.1:{routed_port}", security.client(), options=_big()) as routed_channel,
            connect.channel(f"127.0.0.1:{plain_port}", security.client(), options=_big()) as plain_channel,
        ):
            routed, plain = pb_grpc.InferenceStub(routed_channel), pb_grpc.InferenceStub(plain_channel)
            cases = [(name, datas, False) for name, datas in inputs(args.calls + args.warmup).items()]
            # The SR too, and the case keeps the source's header for its verified SR: a pixel flipped (a new image
            # to review, not one already in review).
            flipped = [
                d[:-4] + (int.from_bytes(d[-4:-2], "little") ^ 0x0FFF).to_bytes(2, "little") + d[-2:]
                for d in cases[-1][1]
            ]
            cases.append(("RG1_UNCI.dcm with DICOM results", flipped, True))
            for name, datas, dicom_out in cases:
                output = pb.OutputOptions(dicom_results=dicom_out)
                sides: dict[str, list[float]] = {"routed": [], "unrouted": []}
                stages: dict[str, dict[str, list[float]]] = {"routed": {}, "unrouted": {}}
                route_ms: list[float] = []
                gaps: list[float] = []
                for i, data in enumerate(datas):
                    order = [("routed", routed), ("unrouted", plain)]
                    for side, stub in order if i % 2 == 0 else order[::-1]:
                        started = time.perf_counter()
                        request = pb.ClassifyRequest(image=pb.ImageInput(data=data), output=output)
                        answer = stub.Classify(request, timeout=60)
                        took = time.perf_counter() - started
                        if i < args.warmup:
                            continue
                        sides[side].append(took)
                        t = answer.timings
                        added = t.decode_ms + t.preprocess_ms + t.triton_ms + t.encode_ms + t.dicom_ms + t.route_ms
                        gaps.append((t.total_ms - added) / t.total_ms)
                        for stage in ("decode", "preprocess", "triton", "dicom", "route", "total"):
                            stages[side].setdefault(stage, []).append(getattr(t, f"{stage}_ms"))
                        if side == "routed":
                            route_ms.append(t.route_ms)
                            assert answer.review and answer.review[0].queued, answer.review
                point = {
                    "routed": percentiles(sides["routed"]),
                    "unrouted": percentiles(sides["unrouted"]),
                    "ratio_p50": round(statistics.median(sides["routed"]) / statistics.median(sides["unrouted"]), 3),
                    "route_stage_p50_ms": round(statistics.median(route_ms), 2),
                    "stages_p50_ms": {
                        side: {stage: round(statistics.median(v), 2) for stage, v in by_stage.items()}
                        for side, by_stage in stages.items()
                    },
                    "stages_short_of_total_max_pct": round(100 * max(gaps), 2),
                }
                results[name] = point
                print(f"{name}: {point}", flush=True)
    return results


def _load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def _big() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of tritonserver")
    parser.add_argument("--hang", type=float, default=5.0, help="seconds tritonserver is stopped (SIGSTOP)")
    parser.add_argument("--calls", type=int, default=40, help="Classify calls per side and input")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--skip", choices=["recovery", "routing"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "supervision.json")
    args = parser.parse_args(argv)

    import cv2

    from training.phantoms import generate, model_space

    png = cv2.imencode(".png", model_space(generate(np.random.default_rng(4242)))["image"])[1].tobytes()
    request = pb.ClassifyRequest(image=pb.ImageInput(data=png))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"kills": args.kills, "hang_s": args.hang, "calls": args.calls, "warmup": args.warmup},
    }
    with tempfile.TemporaryDirectory(prefix="medgate-bench-") as folder:
        scratch = Path(folder)
        security = Security(stack_security.make_credentials(scratch / "credentials"), scratch / "audit", secure=True)
        if "recovery" not in args.skip:
            results["recovery"] = recovery(args, security, request)
        if "routing" not in args.skip:
            load = _load()  # other work on the machine moves these numbers more than the margins measured
            results["routing_classify"] = routing(args, security, scratch)
            results["routing_load_average"] = {"start": load, "end": _load()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
