"""Why did Python-backend models answer with empty output tensors on the lent GPU machine? (issue 15 item 7)

Starts the wheel's tritonserver on ``bench/gpu/probe_models`` (two diagnostic models, nothing of medgate's) once
per *variant*: a folder put first on PATH, whose ``python3`` the Python-backend stub embeds (DESIGN.md §7), with
the stub built for that interpreter's version. Each variant sends x = [1, 2, 3, 4] to both models over Triton's
HTTP/JSON API: ``numpy_probe`` makes its outputs with ``pb_utils.Tensor(name, numpy array)``, ``dlpack_probe``
with ``pb_utils.Tensor.from_dlpack`` from PyTorch tensors (on CUDA when there is one). ``y`` must be
[3, 5, 7, 9] and ``x_seen`` the input. Each model's own report (numpy version and file, sys.executable, torch and
CUDA, what failed) is read from the file it writes, so it arrives even when every tensor is empty.

Standard library only: it runs under whatever ``python3`` the machine has, before anything else is installed.

    python bench/gpu/diagnose.py --server-dir DIR --variant default=/usr/bin --variant numpy1=/tmp/np1/bin \\
        --out report.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROBE_REPOSITORY = HERE / "probe_models"
MODELS = ("numpy_probe", "dlpack_probe")
X = [1.0, 2.0, 3.0, 4.0]
EXPECTED = {"y": [3.0, 5.0, 7.0, 9.0], "x_seen": X}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_version(bin_dir: Path) -> str:
    """The ``major.minor`` of the ``python3`` in ``bin_dir`` (the one the stub will embed)."""
    out = subprocess.run(
        [str(bin_dir / "python3"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    """Shared libraries ``ldd`` cannot find for ``binary`` under ``env`` (empty when ldd is absent)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    out = subprocess.run([ldd, str(binary)], capture_output=True, text=True, env=env, timeout=60)
    return [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]


def server_env(bin_dir: Path) -> dict[str, str]:
    """tritonserver's environment with ``bin_dir`` first on PATH: the stubs embed the ``python3`` found there."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the stub ignores it anyway (DESIGN.md §7); keep the variants comparable
    return env


def backend_dir(server_dir: Path, version: str, scratch: Path) -> Path:
    """A backends/ folder whose python/ holds the wheel's Python backend and the stub for ``version``."""
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"no Python backend stub for Python {version} in {server_dir}")
    python_dir = scratch / "backends" / "python"
    python_dir.mkdir(parents=True)
    for item in (server_dir / "backends" / "python").iterdir():
        if item.is_file():
            (python_dir / item.name).symlink_to(item)
    (python_dir / stub.name).symlink_to(stub)
    return scratch / "backends"


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(raw)
        return exc.code, raw.decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class Server:
    """A running tritonserver: its HTTP base URL, gRPC address, pid and each model's load state."""

    http: str
    grpc: str
    pid: int
    states: dict[str, Any]


@contextlib.contextmanager
def tritonserver(
    server_dir: Path,
    repository: Path,
    backends: Path,
    env: dict[str, str],
    log_path: Path,
    *,
    models: tuple[str, ...] = MODELS,
    timeout_s: float,
) -> Iterator[Server]:
    """tritonserver on ``repository`` until the block ends, yielded once each of ``models`` loaded or failed to.

    A model that fails to load does not stop the server (``--exit-on-error=false``): the other one still answers.
    """
    http, grpc = free_port(), free_port()
    command = [
        str(server_dir / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        "--allow-metrics=false",
        "--exit-on-error=false",
        "--strict-readiness=false",
        "--exit-timeout-secs=3",
        "--log-verbose=0",
    ]
    base = f"http://127.0.0.1:{http}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            states: dict[str, Any] = {}
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with status {process.returncode} (log: {log_path.name})")
                with contextlib.suppress(OSError, ValueError):
                    status, index = http_json(f"{base}/v2/repository/index", {}, timeout=2)
                    if status == 200 and isinstance(index, list):
                        states = {m["name"]: {"state": m.get("state"), "reason": m.get("reason", "")} for m in index}
                        if all(states.get(m, {}).get("state") in {"READY", "UNAVAILABLE"} for m in models):
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"models not loaded in {timeout_s:.0f} s: {states} (log: {log_path.name})")
                time.sleep(0.2)
            yield Server(base, f"127.0.0.1:{grpc}", process.pid, states)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            # The stubs share the server's process group; a stub stuck in a loop outlives a TERM to the server.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def judge(outputs: dict[str, Any]) -> dict[str, str]:
    """Per output: ``correct``, ``empty`` (no values), ``wrong`` (other values) or ``missing``."""
    verdicts = {}
    for name, want in EXPECTED.items():
        got = outputs.get(name)
        if got is None:
            verdicts[name] = "missing"
        elif len(got) == 0:
            verdicts[name] = "empty"
        elif [float(v) for v in got] == want:
            verdicts[name] = "correct"
        else:
            verdicts[name] = "wrong"
    return verdicts


def ask(base: str, model: str, repository: Path) -> dict[str, Any]:
    """One request to ``model``: its outputs, their verdicts and the model's own report."""
    result: dict[str, Any] = {}
    body = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": X}]}
    try:
        status, answer = http_json(f"{base}/v2/models/{model}/infer", body, timeout=30)
        result["http_status"] = status
    except OSError as exc:  # a stub stuck in a loop: the request times out
        status, answer = 0, None
        result["error"] = f"{type(exc).__name__}: {exc}"
    outputs: dict[str, Any] = {}
    if isinstance(answer, dict):
        for output in answer.get("outputs", []):
            outputs[output["name"]] = output.get("data", [])
            result.setdefault("shapes", {})[output["name"]] = output.get("shape")
        if "error" in answer:
            result["error"] = answer["error"]
    elif answer is not None:
        result["error"] = str(answer)[:2000]
    info = outputs.pop("info", None)
    result["outputs"] = outputs
    with contextlib.suppress(ValueError, TypeError, IndexError):
        result["info_output"] = json.loads(info[0]) if info else None
    reports = sorted((repository / model).glob(f"probe-{model}-*.json"), key=lambda p: p.stat().st_mtime)
    with contextlib.suppress(ValueError):
        result["model_report"] = json.loads(reports[-1].read_text()) if reports else None
    result["verdicts"] = judge(outputs)
    # The input as the model read it (as_numpy or DLPack): numpy 2 under the 2.51 stub reads [1, 1, 1, 1] here.
    report = result.get("model_report") or {}
    seen = report.get("x_as_numpy", report.get("x_from_dlpack"))
    if seen is not None:
        result["verdicts"]["input_read"] = "correct" if [float(v) for v in seen] == X else f"wrong {seen}"
    result["ok"] = all(v == "correct" for v in result["verdicts"].values())
    return result


def run_variant(
    name: str, bin_dir: Path, server_dir: Path, work: Path, *, probe_torch: bool, timeout_s: float
) -> dict[str, Any]:
    """Start the server with ``bin_dir`` first on PATH, ask each model once, return what came back."""
    result: dict[str, Any] = {"variant": name, "path_first": str(bin_dir), "models": {}}
    env = server_env(bin_dir)
    scratch = work / name
    scratch.mkdir(parents=True)
    log_path = work / f"triton-{name}.log"
    result["log"] = log_path.name
    try:
        version = python_version(bin_dir)
        result["python"] = version
        backends = backend_dir(server_dir, version, scratch)
        result["stub_missing_libraries"] = missing_libraries(backends / "python" / "triton_python_backend_stub", env)
        repository = scratch / "models"
        shutil.copytree(PROBE_REPOSITORY, repository)  # symlinks followed: dlpack_probe gets its own model.py
        if probe_torch:
            config = repository / "numpy_probe" / "config.pbtxt"
            text = config.read_text()
            config.write_text(
                text.replace(
                    'key: "probe_torch", value: { string_value: "0"', 'key: "probe_torch", value: { string_value: "1"'
                )
            )
        with tritonserver(server_dir, repository, backends, env, log_path, timeout_s=timeout_s) as server:
            states = result["load_states"] = server.states
            for model in MODELS:
                if states.get(model, {}).get("state") == "READY":
                    result["models"][model] = ask(server.http, model, repository)
                else:
                    result["models"][model] = {"ok": False, "error": f"not loaded: {states.get(model)}"}
    except Exception as exc:  # one variant failing must not hide the others' answers
        result["error"] = f"{type(exc).__name__}: {exc}"
    if log_path.exists():
        lines = log_path.read_text(errors="replace").splitlines()
        result["log_lines"] = len(lines)
        result["log_errors"] = [line[:300] for line in lines if line[:1] == "E" or "Error" in line][:20]
    result["working"] = [m for m, r in result["models"].items() if r.get("ok")]
    return result


def conclude(results: list[dict[str, Any]]) -> str:
    """One line per variant: the numpy it saw and each model's verdicts."""
    parts = []
    for r in results:
        if not r["models"]:
            parts.append(f"{r['variant']}: no answer ({r.get('error', 'unknown')})")
            continue
        seen = []
        for model, answer in r["models"].items():
            report = answer.get("model_report") or {}
            verdicts = answer.get("verdicts") or {}
            what = ", ".join(f"{k} {v}" for k, v in verdicts.items()) or "no verdict"
            if not answer.get("ok") and answer.get("error"):
                what += f" ({str(answer['error'])[:160]})"
            seen.append(f"{model} [numpy {report.get('numpy_version', '?')}]: {what}")
        parts.append(f"{r['variant']}: " + "; ".join(seen))
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-dir", type=Path, required=True, help="pytriton's tritonserver/ folder")
    parser.add_argument(
        "--variant", action="append", required=True, help="NAME=BIN_DIR: that folder's python3 first on PATH"
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--logs", type=Path, help="where the servers' logs go (default: beside --out)")
    parser.add_argument("--probe-torch", action="store_true", help="the model also reports torch and CUDA")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each server to become ready")
    args = parser.parse_args(argv)
    logs = args.logs or args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="medgate-gpu-diag-") as scratch:
        for spec in args.variant:
            name, _, folder = spec.partition("=")
            result = run_variant(
                name,
                Path(folder),
                args.server_dir.resolve(),
                Path(scratch),
                probe_torch=args.probe_torch,
                timeout_s=args.timeout,
            )
            log_file = Path(scratch) / f"triton-{name}.log"
            if log_file.exists():
                shutil.copy(log_file, logs / log_file.name)
            results.append(result)
            print(f"diagnose {name}: working {result['working']} {result.get('error', '')}", flush=True)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "expected": EXPECTED,
        "variants": results,
        "working": {r["variant"]: r["working"] for r in results},
        "summary": conclude(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["summary"], flush=True)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
