"""End to end against the in-process floor, and the gateway against Triton at 16 clients (issue 15 item 6).

Two sections of ``bench/bench_gateway.py`` (``--sections floor direct16``), in their own module:

- ``floor``: ``Classify`` p50 on RG1_UNCI.dcm and on a 1024x1024 PNG from the Python client, and from ghz
  (a Go client) when ``ghz`` is on PATH, against the sum of the stage floors measured in the same run,
  interleaved round by round: decode (pydicom ``dcmread`` + ``pixel_array``; ``cv2.imdecode``), window to
  8 bit (the project's ``render``), letterbox to 1024 (the project's ``Letterbox``, INTER_AREA when
  shrinking) and a direct tritonclient gRPC call of the classifier on the prepared uint8 tensor. The
  gateway's own stage timings from the answers say where the difference goes, with two more arms in the
  rotation: the same file sent by reference (its path under ``gateway.reference_roots``: what moving the
  bytes costs) and an empty health check (what any round trip to the gateway costs).
- ``direct16``: req/s of the gateway's ``Classify`` (1024 PNG) at 16 concurrent clients against the
  classifier called directly through tritonclient with the same tensor at 16 clients, the same Python
  generator on both (and ghz on the gateway side when on PATH), arms alternating in short windows. Beside each
  arm's req/s: the CPU time per request of the gateway process (and of its event-loop thread alone) and of
  Triton's process group, from /proc around each window. Unlike req/s on a shared machine, CPU time per request
  hardly moves with the load others put on the cores, so it says where a request's work goes (and what a change
  saved) even when the req/s of two runs cannot be compared.

ghz is optional: without it the sections say "ghz not on PATH" and run the Python arms. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pydicom
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import bench_gateway as gw
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.imaging.ingest.dicom_render import inverts
from services.imaging.ingest.render import render
from services.imaging.limits import IngestLimits
from services.imaging.prepare import prepare
from services.imaging.preprocess import Letterbox

STAGES = ("decode_ms", "preprocess_ms", "triton_ms", "encode_ms", "route_ms", "total_ms")
GHZ_ABSENT = "ghz not on PATH"
# Local subchannels: each client its own TCP connection, on both arms alike.
_TRITON_ARGS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ghz_path() -> str | None:
    return shutil.which("ghz")


def _median(values: list[float]) -> float:
    return round(float(np.median(values)), 3)


class Floor:
    """The in-process pipeline of one input, a stage at a time, each timed: what the gateway cannot beat."""

    def __init__(self, data: bytes, triton: triton_grpc.InferenceServerClient) -> None:
        self.data = data
        self.is_dicom = data[128:132] == b"DICM"
        reference = prepare(data, limits=IngestLimits())
        self.window = reference.decoded.info.window  # the window the gateway chose (the file's own here)
        self.expected = reference.model_image
        self.triton = triton
        self.invert = False
        if self.is_dicom:
            ds = pydicom.dcmread(io.BytesIO(data))
            self.invert = inverts(ds, str(ds.PhotometricInterpretation))

    def decode(self) -> np.ndarray:
        if self.is_dicom:
            return np.asarray(pydicom.dcmread(io.BytesIO(self.data)).pixel_array)
        return np.asarray(cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_UNCHANGED))

    def window_u8(self, pixels: np.ndarray) -> np.ndarray:
        return render(pixels, self.window, invert=self.invert)

    @staticmethod
    def letterbox(pixels: np.ndarray) -> np.ndarray:
        return Letterbox.for_shape(pixels.shape[0], pixels.shape[1]).apply(pixels)

    def infer(self, square: np.ndarray) -> np.ndarray:
        tensor = square[None]
        image = triton_grpc.InferInput("image", list(tensor.shape), "UINT8")
        image.set_data_from_numpy(tensor)
        return np.asarray(self.triton.infer("classifier", [image]).as_numpy("probabilities"))

    def run(self) -> tuple[dict[str, float], np.ndarray]:
        """One pass, each stage's seconds."""
        times: dict[str, float] = {}
        began = time.perf_counter()
        pixels = self.decode()
        at = time.perf_counter()
        times["decode"], began = at - began, at
        u8 = self.window_u8(pixels)
        at = time.perf_counter()
        times["window"], began = at - began, at
        square = self.letterbox(u8)
        at = time.perf_counter()
        times["letterbox"], began = at - began, at
        probabilities = self.infer(square)
        times["triton"] = time.perf_counter() - began
        return times, probabilities


def _ghz_batch(
    ghz: str,
    target: str,
    request_file: Path,
    *,
    calls: int,
    concurrency: int = 1,
    seconds: float = 0.0,
    method: str = "medgate.v1.Inference.Classify",
    protoset: Path | None = None,
) -> dict[str, Any]:
    """One ghz run (by server reflection unless ``protoset``); its per-call latencies (s) and its count."""
    command = [ghz, "--insecure", "--call", method, "-B", str(request_file)]
    command += ["--protoset", str(protoset)] if protoset else []
    command += ["-c", str(concurrency), "-t", "60s", "-O", "json"]
    command += ["-z", f"{seconds}s", "--duration-stop=wait"] if seconds else ["-n", str(calls)]
    done = subprocess.run([*command, target], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"ghz failed: {done.stderr.strip()[:300]}")
    report = json.loads(done.stdout)
    details = report.get("details") or []
    return {
        "latencies": [d["latency"] / 1e9 for d in details if d.get("status") == "OK"],
        "errors": sum(1 for d in details if d.get("status") != "OK"),
        "count": int(report.get("count", 0)),
        "rps": float(report.get("rps", 0.0)),
        "seconds": float(report.get("total", 0)) / 1e9,  # ghz's own clock, nanoseconds
        "codes": report.get("statusCodeDistribution", {}),
    }


def floor(
    name: str,
    data: bytes,
    target: str,
    security: gw.Security,
    triton_url: str,
    *,
    calls: int,
    warmup: int,
    reference: Path | None = None,
    ghz_every: int = 10,
) -> dict[str, Any]:
    """Round by round: the floor pipeline and one Python Classify (rotating order); ghz batches between.

    ``reference``: the same file under the gateway's ``reference_roots``, a third arm that sends its path
    instead of its bytes (what moving the bytes through gRPC costs).
    """
    triton = triton_grpc.InferenceServerClient(triton_url, channel_args=_TRITON_ARGS)
    pipeline = Floor(data, triton)
    channel = gw.channel(target, security)
    stub = pb_grpc.InferenceStub(channel)
    request = pb.ClassifyRequest(image=pb.ImageInput(data=data))
    by_path = pb.ImageInput(reference=pb.ImageReference(file_path=str(reference))) if reference else None
    ghz = ghz_path()
    ghz_every = max(1, min(ghz_every, calls))
    health = health_pb2_grpc.HealthStub(channel)  # an empty call: what any round trip to the gateway costs
    arms = ["floor", "python", "roundtrip", *(["python_by_reference"] if by_path else [])]
    roundtrips: list[float] = []
    by_reference: list[float] = []
    by_reference_timings: list[pb.StageTimings] = []
    floors: dict[str, list[float]] = {stage: [] for stage in ("decode", "window", "letterbox", "triton")}
    floor_sums: list[float] = []
    python: list[float] = []
    ghz_latencies: list[float] = []
    ghz_errors = 0
    timings: list[pb.StageTimings] = []
    with tempfile.TemporaryDirectory(prefix="medgate-bench-floor-") as scratch:
        request_file = Path(scratch) / "classify.bin"
        request_file.write_bytes(request.SerializeToString())
        # The floor's square is the gateway's, and both answer the same.
        _, probabilities = pipeline.run()
        assert np.array_equal(Floor.letterbox(pipeline.window_u8(pipeline.decode())), pipeline.expected)
        answer = stub.Classify(request, timeout=60)
        assert abs(max(s.score for s in answer.scores) - float(probabilities.max())) < 1e-4, (
            "gateway and floor disagree"
        )
        if ghz:
            _ghz_batch(ghz, target, request_file, calls=max(2, warmup // 2))  # ghz's own warm-up
        if by_path is not None:
            assert stub.Classify(pb.ClassifyRequest(image=by_path), timeout=60).scores == answer.scores
        for index in range(warmup + calls):
            for arm in arms[index % len(arms) :] + arms[: index % len(arms)]:
                if arm == "floor":
                    times, _ = pipeline.run()
                    if index >= warmup:
                        for stage, seconds in times.items():
                            floors[stage].append(seconds)
                        floor_sums.append(sum(times.values()))
                elif arm == "roundtrip":
                    began = time.perf_counter()
                    health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                    if index >= warmup:
                        roundtrips.append(time.perf_counter() - began)
                elif arm == "python_by_reference":
                    began = time.perf_counter()
                    response = stub.Classify(pb.ClassifyRequest(image=by_path), timeout=60)
                    if index >= warmup:
                        by_reference.append(time.perf_counter() - began)
                        by_reference_timings.append(response.timings)
                else:
                    began = time.perf_counter()
                    response = stub.Classify(request, timeout=60)
                    elapsed = time.perf_counter() - began
                    if index >= warmup:
                        python.append(elapsed)
                        timings.append(response.timings)
            if ghz and index >= warmup and (index - warmup) % ghz_every == ghz_every - 1:
                batch = _ghz_batch(ghz, target, request_file, calls=ghz_every + 1)
                ghz_latencies += batch["latencies"][1:]  # each run's first call opens its connection
                ghz_errors += batch["errors"]
    channel.close()
    triton.close()
    floor_p50 = {stage: gw.percentiles(values)["p50_ms"] for stage, values in floors.items()}
    floor_sum = round(sum(floor_p50.values()), 3)
    stage_p50 = {stage: _median([getattr(t, stage) for t in timings]) for stage in STAGES}
    python_stats = gw.percentiles(python)
    result: dict[str, Any] = {
        "input": name,
        "input_bytes": len(data),
        "floor_p50_ms": floor_p50,
        "floor_sum_p50_ms": floor_sum,  # the sum of the stages' p50s
        "floor_pipeline": gw.percentiles(floor_sums),  # the same four stages, each pass's own sum
        "python_e2e": python_stats,
        "python_e2e_over_floor_sum": round(python_stats["p50_ms"] / floor_sum, 3),
        "gateway_stage_p50_ms": stage_p50,
        # The part of the Python client's p50 that no gateway stage covers: gRPC both ways, (de)serialising.
        "python_e2e_outside_gateway_total_ms": round(python_stats["p50_ms"] - stage_p50["total_ms"], 3),
        "empty_health_check_roundtrip": gw.percentiles(roundtrips),
        "gateway_stages_minus_floor_ms": {
            "decode_plus_preprocess_vs_decode_window_letterbox": round(
                stage_p50["decode_ms"]
                + stage_p50["preprocess_ms"]
                - floor_p50["decode"]
                - floor_p50["window"]
                - floor_p50["letterbox"],
                3,
            ),
            "triton": round(stage_p50["triton_ms"] - floor_p50["triton"], 3),
        },
    }
    if by_reference:
        stats = gw.percentiles(by_reference)
        result["python_e2e_by_reference"] = stats
        result["python_e2e_by_reference_over_floor_sum"] = round(stats["p50_ms"] / floor_sum, 3)
        result["gateway_stage_p50_ms_by_reference"] = {
            stage: _median([getattr(t, stage) for t in by_reference_timings]) for stage in STAGES
        }
    if ghz:
        ghz_stats = gw.percentiles(ghz_latencies) if ghz_latencies else {}
        result["ghz_e2e"] = {
            **ghz_stats,
            "errors": ghz_errors,
            "batch": ghz_every,
            "first_call_of_each_run_dropped": True,
        }
        if ghz_stats:
            result["ghz_e2e_over_floor_sum"] = round(ghz_stats["p50_ms"] / floor_sum, 3)
    else:
        result["ghz_e2e"] = GHZ_ABSENT
    return result


def _load(
    clients: int, seconds: float, make_call: Callable[[int], tuple[Callable[[], Any], Callable[[], None]]]
) -> dict[str, Any]:
    """``clients`` threads, each calling its own ``make_call(index)`` (a call, a close) for ``seconds``."""
    counts = [0] * clients
    errors = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(index: int) -> None:
        call, close = make_call(index)
        try:
            call()  # connect and warm up before the clock starts
            start.wait()
            while time.monotonic() < stop_at[0]:
                began = time.perf_counter()
                try:
                    call()
                    counts[index] += 1
                    latencies[index].append(time.perf_counter() - began)
                except (grpc.RpcError, triton_grpc.InferenceServerException):
                    errors[index] += 1
        finally:
            close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + 3600.0
    start.wait()
    began = time.monotonic()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    merged = [x for row in latencies for x in row]
    return {"requests": sum(counts), "errors": sum(errors), "seconds": elapsed, "latencies": merged}


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_s(stat_path: Path) -> float:
    """User plus system CPU seconds from a /proc ``stat`` file (0 when the process or thread is gone)."""
    try:
        stat = stat_path.read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()  # comm may hold spaces: split after the last ")"
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_snapshot(gateway_pid: int | None, triton_pid: int | None) -> dict[str, float]:
    """CPU seconds so far: the gateway process, its main (event-loop) thread, and Triton's whole process group
    (tritonserver and its Python-backend stubs). Keys are left out where a pid is unknown or not on Linux."""
    from services.triton.embedded import group_members

    snapshot: dict[str, float] = {}
    if not Path("/proc/self/stat").exists():
        return snapshot
    if gateway_pid is not None:
        snapshot["gateway_process"] = _cpu_s(Path(f"/proc/{gateway_pid}/stat"))
        snapshot["gateway_event_loop_thread"] = _cpu_s(Path(f"/proc/{gateway_pid}/task/{gateway_pid}/stat"))
    if triton_pid is not None:
        snapshot["triton_process_group"] = sum(_cpu_s(Path(f"/proc/{pid}/stat")) for pid in group_members(triton_pid))
    return snapshot


def _triton_protoset(path: Path) -> None:
    """Triton's gRPC API as a protoset for ghz (Triton serves no reflection), from tritonclient's own descriptors."""
    from google.protobuf import descriptor_pb2
    from google.protobuf.descriptor import FileDescriptor
    from tritonclient.grpc import service_pb2

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: FileDescriptor) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        descriptor.CopyToProto(files.file.add())

    add(service_pb2.DESCRIPTOR)
    path.write_bytes(files.SerializeToString())


def _triton_request(tensor: np.ndarray) -> bytes:
    """The ModelInferRequest tritonclient sends for the classifier on ``tensor`` (raw contents), serialized."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="image", datatype="UINT8", shape=list(tensor.shape))
    request.raw_input_contents.append(tensor.tobytes())
    return request.SerializeToString()


def direct16(
    target: str,
    security: gw.Security,
    png: bytes,
    triton_url: str,
    *,
    clients: int = 16,
    seconds: float = 5.0,
    rounds: int = 3,
    gateway_pid: int | None = None,
    triton_pid: int | None = None,
) -> dict[str, Any]:
    """Gateway Classify and direct tritonclient at ``clients`` each, windows alternating over ``rounds``.

    ``gateway_pid``, ``triton_pid`` (Triton's process group): each arm's CPU milliseconds per request, when given.
    """
    request = pb.ClassifyRequest(image=pb.ImageInput(data=png))
    tensor = prepare(png, limits=IngestLimits()).model_image[None]
    ghz = ghz_path()

    def gateway_call(index: int) -> tuple[Callable[[], Any], Callable[[], None]]:
        channel = gw.channel(target, security, index)
        stub = pb_grpc.InferenceStub(channel)
        return (lambda: stub.Classify(request, timeout=60)), channel.close

    def direct_call(index: int) -> tuple[Callable[[], Any], Callable[[], None]]:
        client = triton_grpc.InferenceServerClient(
            triton_url, channel_args=[*_TRITON_ARGS, ("medgate.bench.client", index)]
        )
        image = triton_grpc.InferInput("image", list(tensor.shape), "UINT8")
        image.set_data_from_numpy(tensor)
        return (lambda: client.infer("classifier", [image], client_timeout=60)), client.close

    arms: dict[str, Callable[[int], tuple[Callable[[], Any], Callable[[], None]]]] = {
        "gateway_python": gateway_call,
        "direct_triton_python": direct_call,
    }
    totals: dict[str, dict[str, Any]] = {
        arm: {"requests": 0, "errors": 0, "seconds": 0.0, "latencies": [], "cpu_s": {}} for arm in arms
    }
    if ghz:
        for arm in ("gateway_ghz", "direct_triton_ghz"):
            totals[arm] = {"requests": 0, "errors": 0, "seconds": 0.0, "latencies": [], "cpu_s": {}}
    with tempfile.TemporaryDirectory(prefix="medgate-bench-direct16-") as scratch:
        request_file = Path(scratch) / "classify.bin"
        request_file.write_bytes(request.SerializeToString())
        triton_file, protoset = Path(scratch) / "infer.bin", Path(scratch) / "triton.protoset"
        triton_file.write_bytes(_triton_request(tensor))
        _triton_protoset(protoset)
        for round_index in range(rounds):
            names = list(totals)
            names = names[round_index % len(names) :] + names[: round_index % len(names)]
            for arm in names:
                cpu_before = cpu_snapshot(gateway_pid, triton_pid)
                if arm in ("gateway_ghz", "direct_triton_ghz") and ghz:
                    direct = arm == "direct_triton_ghz"
                    batch = _ghz_batch(
                        ghz,
                        triton_url if direct else target,
                        triton_file if direct else request_file,
                        calls=0,
                        concurrency=clients,
                        seconds=seconds,
                        method="inference.GRPCInferenceService.ModelInfer"
                        if direct
                        else "medgate.v1.Inference.Classify",
                        protoset=protoset if direct else None,
                    )
                    point = {
                        "requests": len(batch["latencies"]),
                        "errors": batch["errors"],
                        "seconds": batch["seconds"],
                        "latencies": batch["latencies"],
                    }
                else:
                    point = _load(clients, seconds, arms[arm])
                cpu_after = cpu_snapshot(gateway_pid, triton_pid)
                total = totals[arm]
                for key in ("requests", "errors", "seconds"):
                    total[key] += point[key]
                total["latencies"] += point["latencies"]
                for key, value in cpu_after.items():
                    total["cpu_s"][key] = total["cpu_s"].get(key, 0.0) + value - cpu_before.get(key, value)
    result: dict[str, Any] = {"clients": clients, "window_s": seconds, "rounds": rounds, "input": "png_1024"}
    for arm, total in totals.items():
        result[arm] = {
            "rps": round(total["requests"] / max(total["seconds"], 1e-9), 2),
            "requests": total["requests"],
            "errors": total["errors"],
            "latency": gw.percentiles(total["latencies"]) if total["latencies"] else {},
        }
        if total["cpu_s"] and total["requests"]:
            # For the direct arms the gateway's share is what an idle gateway spends (health polls, Triton probes).
            result[arm]["cpu_ms_per_request"] = {
                key: round(1000.0 * value / total["requests"], 3) for key, value in sorted(total["cpu_s"].items())
            }
    direct_rps = max(result["direct_triton_python"]["rps"], 1e-9)
    result["gateway_python_over_direct_rps"] = round(result["gateway_python"]["rps"] / direct_rps, 3)
    if ghz:
        result["gateway_ghz_over_direct_rps"] = round(result["gateway_ghz"]["rps"] / direct_rps, 3)
        direct_ghz = max(result["direct_triton_ghz"]["rps"], 1e-9)
        result["gateway_ghz_over_direct_ghz_rps"] = round(result["gateway_ghz"]["rps"] / direct_ghz, 3)
    else:
        result["gateway_ghz"] = result["direct_triton_ghz"] = GHZ_ABSENT
    return result


def run_sections(
    sections: set[str], url: str, target: str, security: gw.Security, png: bytes, dicom: bytes, args: argparse.Namespace
) -> dict[str, Any]:
    """``floor`` and ``direct16`` on one gateway (1 worker, plaintext), the load average beside each."""
    from services.gateway.server import tune_allocator
    from services.settings import load_settings

    out: dict[str, Any] = {}
    port = int(target.rsplit(":", 1)[1])
    # The bench process keeps big buffers in its heap as the gateway does: the floors get the gateway's allocator.
    gateway = load_settings().gateway
    tuned = tune_allocator(gateway.malloc_mmap_threshold_bytes, gateway.malloc_trim_threshold_bytes)
    roots = "MEDGATE_GATEWAY_REFERENCE_ROOTS"  # the inputs as files too, for the by-reference arm
    with (
        tempfile.TemporaryDirectory(prefix="medgate-bench-floor-") as folder,
        gw.gateway_process(url, port, 1, security, extra_env={roots: folder}) as gateway_pid,
    ):
        files = {"png": Path(folder) / "phantom-1024.png", "dicom": Path(folder) / "RG1_UNCI.dcm"}
        files["png"].write_bytes(png)
        files["dicom"].write_bytes(dicom)
        if "floor" in sections:
            started, before = _now(), load_average()
            calls, warmup = args.calls, args.warmup
            inputs = [
                floor("png_1024", png, target, security, url, calls=calls, warmup=warmup, reference=files["png"]),
                floor(
                    "RG1_UNCI.dcm",
                    dicom,
                    target,
                    security,
                    url,
                    calls=calls // 2,
                    warmup=warmup // 2,
                    reference=files["dicom"],
                ),
            ]
            out["floor"] = {
                "started": started,
                "bench_allocator_tuned": tuned,
                "ghz": ghz_path() or GHZ_ABSENT,
                "load_average_before_after": [before, load_average()],
                "inputs": inputs,
            }
            print(json.dumps(out["floor"], indent=2), flush=True)
        if "direct16" in sections:
            started, before = _now(), load_average()
            point = direct16(
                target,
                security,
                png,
                url,
                seconds=args.direct_seconds,
                rounds=args.direct_rounds,
                gateway_pid=gateway_pid,
                triton_pid=getattr(args, "triton_pid", None),
            )
            out["direct16"] = {"started": started, **point, "load_average_before_after": [before, load_average()]}
            print(json.dumps(out["direct16"], indent=2), flush=True)
    return out
