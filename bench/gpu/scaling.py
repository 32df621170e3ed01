"""Gateway worker scaling on a many-core machine (issue 15 item 7): Classify req/s and p50/p99 per worker count.

One tritonserver serves only the classifier (a copy of its config with ``--instances`` instances, its version
folder symlinked), started with ``--python-bin`` first on PATH: the interpreter whose numpy gives correct tensors
(``bench/gpu/diagnose.py`` finds it). For each worker count a ``medgate serve --workers N`` (plaintext, review,
report and DICOM off, this Triton as its external one) takes Classify of one 1024x1024 PNG from ``--clients``
calls in flight, spread over several load processes running :func:`bench.loadgen.run_load` (a single Python
client process would be the bottleneck first). The same Triton called directly at the same concurrency, with
the tensor the gateway would send, is the ceiling. A benchmark, not a test: nothing here asserts.

    python -m bench.gpu.scaling --server-dir DIR --python-bin /tmp/np1/bin --out scaling.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.gpu import diagnose

ROOT = Path(__file__).resolve().parents[2]
CLASSIFY = "/medgate.v1.Inference/Classify"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def classifier_repository(scratch: Path, *, instances: int, threads: int, runtime: str = "onnx") -> Path:
    """A model repository holding only the classifier: its config with ``instances``, its version folder symlinked.

    ``runtime`` ``onnx``: triton_models/classifier as served (ONNX Runtime, ``threads`` intra-op threads);
    ``torch``: the same model with its config.pbtxt parameter ``runtime: torch`` (PyTorch with the weights of the
    same model.onnx, on CUDA when torch sees a GPU, else ``threads`` threads; triton_models/medgate_torch_nets.py).
    """
    source = ROOT / "triton_models" / "classifier"
    target = scratch / "models" / "classifier"
    target.mkdir(parents=True)
    for entry in source.iterdir():  # labels.txt and other files beside the config
        if entry.is_file() and entry.name != "config.pbtxt":
            shutil.copy(entry, target / entry.name)
    for entry in source.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            (target / entry.name).symlink_to(entry.resolve())
    config = (source / "config.pbtxt").read_text()
    marker = "kind: KIND_CPU\n    count: 1"
    if marker not in config:
        raise RuntimeError(f"{source}/config.pbtxt: no 'count: 1' CPU instance group to scale")
    config = config.replace(marker, f"kind: KIND_CPU\n    count: {instances}")
    threads_marker = 'key: "intra_op_threads"\n  value: { string_value: "2" }'
    if threads_marker in config:
        config = config.replace(threads_marker, f'key: "intra_op_threads"\n  value: {{ string_value: "{threads}" }}')
    runtime_marker = 'key: "runtime"\n  value: { string_value: "onnxruntime" }'
    if runtime_marker not in config:
        raise RuntimeError(f"{source}/config.pbtxt: no runtime parameter to set")
    chosen = {"onnx": "onnxruntime", "torch": "torch"}[runtime]
    config = config.replace(runtime_marker, f'key: "runtime"\n  value: {{ string_value: "{chosen}" }}')
    (target / "config.pbtxt").write_text(config)
    return scratch / "models"


def png_request() -> tuple[bytes, bytes]:
    """A serialized ClassifyRequest of a 1024x1024 phantom PNG, and the ModelInferRequest the gateway would send."""
    import cv2
    from tritonclient.grpc import service_pb2

    from medgate.v1 import inference_pb2 as pb
    from services.imaging.limits import IngestLimits
    from services.imaging.prepare import prepare
    from training.phantoms import generate, model_space

    png = cv2.imencode(".png", model_space(generate(np.random.default_rng(4242)))["image"])[1].tobytes()
    classify = pb.ClassifyRequest(image=pb.ImageInput(data=png)).SerializeToString()
    tensor = prepare(png, limits=IngestLimits()).model_image[None]
    infer = service_pb2.ModelInferRequest(model_name="classifier")
    image = infer.inputs.add()
    image.name, image.datatype = "image", "UINT8"
    image.shape.extend(tensor.shape)
    infer.outputs.add().name = "probabilities"
    infer.raw_input_contents.append(np.ascontiguousarray(tensor).tobytes())
    return classify, infer.SerializeToString()


def _load_process(args: tuple[str, str, bytes, int, float]) -> dict[str, Any]:
    """One load process: ``concurrency`` calls in flight, each on its own connection, for ``seconds``."""
    host, path, payload, concurrency, seconds = args
    config = loadgen.LoadConfig(
        name=path.rsplit("/", 1)[-1],
        call=path,
        path=path,
        host=host,
        total=0,
        concurrency=concurrency,
        connections=concurrency,
        duration_s=seconds,
        max_duration_s=None,
        timeout_s=30.0,
        payloads=[payload],
        insecure=True,
    )
    report = asyncio.run(loadgen.run_load(config))
    return {
        "ok_latencies_s": report.ok_latencies_s,
        "count": report.count,
        "total_s": report.total_s,
        "status_codes": report.status_codes,
        "errors": dict(list(report.errors.items())[:3]),
    }


def load(
    pool: Any, host: str, path: str, payload: bytes, *, clients: int, processes: int, seconds: float
) -> dict[str, Any]:
    """``clients`` calls in flight over ``processes`` load processes; merged req/s and latency percentiles."""
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    pool.map(_load_process, [(host, path, payload, share, min(2.0, seconds)) for share in shares])  # warm up
    parts = pool.map(_load_process, [(host, path, payload, share, seconds) for share in shares])
    latencies = np.asarray([x for part in parts for x in part["ok_latencies_s"]]) * 1000.0
    codes: dict[str, int] = {}
    errors: dict[str, int] = {}
    for part in parts:
        for code, n in part["status_codes"].items():
            codes[code] = codes.get(code, 0) + n
        for message, n in part["errors"].items():
            errors[message] = errors.get(message, 0) + n
    window = max(part["total_s"] for part in parts)
    return {
        "clients": clients,
        "load_processes": processes,
        "seconds": round(window, 2),
        "ok": int(latencies.size),
        "rps": round(latencies.size / window, 1) if window else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies.size else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies.size else None,
        "status_codes": codes,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-dir", type=Path, required=True, help="pytriton's tritonserver/ folder")
    parser.add_argument("--python-bin", type=Path, required=True, help="folder whose python3 the stubs embed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--clients", type=int, nargs="+", default=[16])
    parser.add_argument("--seconds", type=float, default=12.0, help="each measured window")
    parser.add_argument("--load-processes", type=int, default=4)
    parser.add_argument("--instances", type=int, default=4, help="classifier instances in Triton")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads per instance")
    parser.add_argument(
        "--runtime", choices=("onnx", "torch"), default="onnx", help="the classifier in ONNX Runtime or PyTorch"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, help="where Triton's log goes (default: beside --out)")
    args = parser.parse_args(argv)

    from bench import bench_gateway, stack_security

    logs = args.logs or args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "input": "1024x1024 phantom PNG, Classify",
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    classify, infer = png_request()
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs gRPC
    with (
        tempfile.TemporaryDirectory(prefix="medgate-gpu-scaling-") as scratch_name,
        context.Pool(args.load_processes) as pool,
    ):
        scratch = Path(scratch_name)
        repository = classifier_repository(
            scratch, instances=args.instances, threads=args.threads, runtime=args.runtime
        )
        version = diagnose.python_version(args.python_bin)
        backends = diagnose.backend_dir(args.server_dir.resolve(), version, scratch / "backend")
        env = diagnose.server_env(args.python_bin)
        log_path = logs / f"triton-scaling-{args.runtime}.log"
        with diagnose.tritonserver(
            args.server_dir.resolve(), repository, backends, env, log_path, models=("classifier",), timeout_s=180
        ) as server:
            results["triton"] = {
                "states": server.states,
                "python_bin": str(args.python_bin),
                "python": version,
                "runtime": args.runtime,
            }
            if server.states.get("classifier", {}).get("state") != "READY":
                results["error"] = f"the classifier did not load: {server.states.get('classifier')}"
                save()
                return 1
            for clients in args.clients:
                point = load(
                    pool,
                    server.grpc,
                    MODEL_INFER,
                    infer,
                    clients=clients,
                    processes=args.load_processes,
                    seconds=args.seconds,
                )
                results.setdefault("direct_triton", {})[f"clients_{clients}"] = point
                print(f"direct triton, {clients} clients: {point['rps']} req/s, p99 {point['p99_ms']} ms", flush=True)
                save()
            security = bench_gateway.Security(
                stack_security.make_credentials(scratch / "credentials"), scratch / "audit"
            )
            off = {f"MEDGATE_MODELS_{role.upper()}": "" for role in ("detector", "segmenter_text", "segmenter_box")}
            for workers in args.workers:
                port = bench_gateway.free_port()
                try:
                    with bench_gateway.gateway_process(server.grpc, port, workers, security, extra_env=off):
                        for clients in args.clients:
                            point = load(
                                pool,
                                f"127.0.0.1:{port}",
                                CLASSIFY,
                                classify,
                                clients=clients,
                                processes=args.load_processes,
                                seconds=args.seconds,
                            )
                            results.setdefault("gateway", {}).setdefault(f"workers_{workers}", {})[
                                f"clients_{clients}"
                            ] = point
                            print(
                                f"gateway {workers} workers, {clients} clients: {point['rps']} req/s, "
                                f"p50 {point['p50_ms']} ms, p99 {point['p99_ms']} ms",
                                flush=True,
                            )
                except Exception as exc:  # one worker count failing must not lose the others
                    results.setdefault("gateway", {})[f"workers_{workers}"] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"gateway {workers} workers: {type(exc).__name__}: {exc}", flush=True)
                save()
    gateway = results.get("gateway", {})
    base = gateway.get("workers_1", {})
    results["speedup_over_1_worker"] = {
        f"workers_{w}": {
            c: round(point["rps"] / base[c]["rps"], 2)
            for c, point in gateway.get(f"workers_{w}", {}).items()
            if isinstance(point, dict) and c in base and base[c].get("rps")
        }
        for w in args.workers
    }
    save()
    print(json.dumps(results["speedup_over_1_worker"]), flush=True)
    with contextlib.suppress(Exception):
        print(f"load average {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
