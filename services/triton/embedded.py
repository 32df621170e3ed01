"""Run the ``tritonserver`` binary that ships in the nvidia-pytriton wheel on ``triton_models/``.

The wheel carries Triton 2.51 with only the Python backend. Its stub for our Python version lives
outside the backend folder, so we assemble a backend directory of symlinks under the cache and point
the server at it, with this interpreter's ``bin`` first on PATH so the stub finds our packages.

The gateway is the only door: the server listens on loopback, and its administrative protocols
(model repository, shared memory, statistics, trace, logging; gRPC and HTTP alike) answer only
requests that carry the :data:`ADMIN_HEADER` with a random key made when the first server of this
process tree starts. The key travels to the gateway's clients (and its spawned workers) in this
process's environment (:data:`ADMIN_KEY_ENV`), never in settings or on disk; :func:`admin_headers`
is what every client of ours sends. Limits: tritonserver takes the key on its command line, which
local users can read in the process list unless /proc is mounted with ``hidepid=2`` (or the gateway
runs in its own PID namespace, as in a container); what it stops is a client that can reach the
loopback port without seeing our processes (another container of a pod, an SSRF). Health, metadata,
model config and inference stay open on loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.settings import PROJECT_ROOT, TritonSettings

log = logging.getLogger("medgate.triton")
server_log = logging.getLogger("medgate.triton.server")

_PR_SET_PDEATHSIG = 1

# Triton's restricted-protocol check: the header an HTTP call carries, and the protocols (gRPC) or APIs
# (HTTP; same names) that need it. Inference, health, metadata and model config stay open. Over gRPC
# Triton 2.51 expects the key under "triton-grpc-protocol-" + the header (its refusal names it).
ADMIN_HEADER = "medgate-triton-admin"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
# The key's carrier to our clients and spawned gateway workers. Not MEDGATE_*: that prefix is for settings,
# and this is no setting (an operator may set it to give an external Triton's restricted key to the gateway).
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"


def admin_key() -> str:
    """The key the embedded servers of this process tree require; made (and put in the environment) on first use."""
    key = os.environ.get(ADMIN_KEY_ENV, "")
    if not key:
        key = secrets.token_urlsafe(32)
        os.environ[ADMIN_KEY_ENV] = key
    return key


def admin_headers(*, http: bool = False) -> dict[str, str]:
    """Headers for Triton's restricted protocols (tritonclient's ``headers=``; gRPC unless ``http``), or {}."""
    key = os.environ.get(ADMIN_KEY_ENV, "")
    return {ADMIN_HEADER if http else GRPC_ADMIN_HEADER: key} if key else {}


class TritonStartError(RuntimeError):
    """The server could not be started or did not become ready in time."""


def pytriton_server_dir() -> Path:
    """The folder of the wheel's tritonserver build (bin/, backends/, python_backend_stubs/).

    Found without importing pytriton: its __init__ pulls in its whole client (gevent, ...), which
    we never use.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tritonserver"


def prepare_backend_dir(cache_dir: Path) -> Path:
    """A backends/ folder whose python/ holds the wheel's backend plus the stub for this Python."""
    source = pytriton_server_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"the pytriton wheel has no Python backend stub for Python {version}")
    python_dir = cache_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    wanted = {item.name: item for item in (source / "backends" / "python").iterdir() if item.is_file()}
    wanted[stub.name] = stub
    for name, target in wanted.items():
        link = python_dir / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return cache_dir


def _die_with_parent() -> None:
    """In the child: ask the kernel to SIGTERM us when the parent dies (Linux), so no orphan keeps the ports."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedTriton:
    """The tritonserver child process: start, wait until every model is READY, forward its log, stop."""

    def __init__(self, settings: TritonSettings, *, cache_dir: Path | None = None) -> None:
        self.settings = settings
        self.cache_dir = cache_dir or PROJECT_ROOT / ".cache" / "triton-backends"
        self._process: subprocess.Popen[str] | None = None
        self._log_tail: deque[str] = deque(maxlen=60)
        self._log_thread: threading.Thread | None = None

    def command(self) -> list[str]:
        s = self.settings
        restricted = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={admin_key()}"
        return [
            str(pytriton_server_dir() / "bin" / "tritonserver"),
            f"--model-repository={s.model_repository}",
            f"--backend-directory={prepare_backend_dir(self.cache_dir)}",
            f"--http-address={s.host}",
            f"--grpc-address={s.host}",
            f"--metrics-address={s.host}",
            f"--http-port={s.http_port}",
            f"--grpc-port={s.grpc_port}",
            f"--metrics-port={s.metrics_port}",
            f"--backend-config=python,shm-default-byte-size={s.python_shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={s.python_shm_growth_bytes}",
            f"--log-verbose={s.log_verbose}",
            f"--exit-timeout-secs={s.exit_timeout_s}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            *shlex.split(s.extra_args),
        ]

    def start(self) -> None:
        if self._process is not None:
            return
        command = self.command()
        env = dict(os.environ)
        env.pop(ADMIN_KEY_ENV, None)  # the server has it on its command line; the models' code need not see it
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        log.info(
            "starting tritonserver on %s (gRPC %d, HTTP %d, metrics %d)",
            self.settings.model_repository,
            self.settings.grpc_port,
            self.settings.http_port,
            self.settings.metrics_port,
        )
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self._log_thread = threading.Thread(target=self._forward_log, name="triton-log", daemon=True)
        self._log_thread.start()

    def _forward_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip()
            if not line:
                continue
            self._log_tail.append(line)
            level = logging.WARNING if line[:1] in {"E", "W"} else logging.INFO
            server_log.log(level, "%s", line)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self) -> str:
        return "\n".join(self._log_tail)

    def wait_ready(self, models: list[str] | None = None) -> list[str]:
        """Block until the server and every model are READY; returns the ready model names."""
        deadline = time.monotonic() + self.settings.startup_timeout_s
        ready = wait_until_ready(
            self.settings.grpc_url,
            models,
            deadline=deadline,
            alive=lambda: self.running,
            call_timeout_s=self.settings.ready_timeout_s,
        )
        if ready is None:
            code = self._process.poll() if self._process else None
            detail = f"exited with status {code}" if code is not None else "did not become ready in time"
            self.stop()
            raise TritonStartError(f"tritonserver {detail}; last log lines:\n{self.log_tail()}")
        return ready

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.settings.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0f s; killing it", self.settings.stop_grace_s)
                process.kill()
                process.wait()
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        log.info("tritonserver stopped (status %s)", process.returncode)

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_ready(
    grpc_url: str,
    models: list[str] | None,
    *,
    deadline: float,
    alive: object = None,
    report_every_s: float = 10.0,
    call_timeout_s: float = TritonSettings.ready_timeout_s,
) -> list[str] | None:
    """Poll Triton over gRPC until it and ``models`` (default: all in its repository) are READY.

    Returns the ready model names, or None when the deadline passes or ``alive()`` turns false.
    Each call is bounded by ``call_timeout_s`` (triton.ready_timeout_s), so a server that accepts the
    connection and never answers cannot hold the loop past the deadline.
    Says what it is waiting for when that changes and every ``report_every_s``; raises
    TritonStartError at once when a model has failed to load (Triton will not retry it).
    """
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(grpc_url)
    headers = admin_headers()  # the repository index is a restricted protocol
    said, said_at = "", 0.0
    try:
        while time.monotonic() < deadline:
            if callable(alive) and not alive():
                return None
            waiting, failure, restricted = "server not reachable yet", "", False
            with contextlib.suppress(Exception):
                if client.is_server_live(client_timeout=call_timeout_s):
                    index = _repository_index(client, headers, call_timeout_s)
                    # Without the admin key (a Triton this process did not start) the index is refused:
                    # readiness alone, of the models named, is still known.
                    restricted = index is None and not models
                    names = models or [entry["name"] for entry in index or []]
                    entries = {entry["name"]: entry for entry in index or []}
                    failed = [n for n in names if entries.get(n, {}).get("state") == "UNAVAILABLE"]
                    if failed:
                        failure = "; ".join(f"{n}: {entries[n].get('reason', '') or 'no reason given'}" for n in failed)
                    pending = [n for n in names if not client.is_model_ready(n, client_timeout=call_timeout_s)]
                    if names and not pending:
                        return names
                    waiting = f"models not ready yet: {', '.join(pending) or 'none in the repository'}"
            if restricted:
                raise TritonStartError(
                    f"Triton at {grpc_url} restricts its model repository: name the models to wait for,"
                    f" or give its admin key in {ADMIN_KEY_ENV}"
                )
            if failure:
                raise TritonStartError(f"Triton at {grpc_url}: models failed to load: {failure}")
            if waiting != said or time.monotonic() - said_at >= report_every_s:
                log.info("waiting for Triton at %s: %s", grpc_url, waiting)
                said, said_at = waiting, time.monotonic()
            time.sleep(0.25)
    finally:
        client.close()
    return None


def _repository_index(client: Any, headers: dict[str, str], timeout_s: float) -> list[dict[str, Any]] | None:
    """Triton's model repository index; None when Triton restricts it and ``headers`` lack its key."""
    from tritonclient.utils import InferenceServerException

    try:
        index = client.get_model_repository_index(headers=headers, as_json=True, client_timeout=timeout_s)
    except InferenceServerException as exc:
        if "restricted" in (exc.message() or "").lower():
            return None
        raise
    return list(index.get("models", []))


@contextlib.contextmanager
def triton_for(settings: TritonSettings, models: list[str] | None = None) -> Iterator[str]:
    """Yield a ready Triton gRPC URL: the embedded server (started and stopped here) or the external one.

    ``models``: the ones we need READY on an external Triton (default: every model in its
    repository); an external server may hold many more, unloaded ones included.
    """
    if settings.embedded:
        with EmbeddedTriton(settings):
            yield settings.grpc_url
        return
    log.info("using the external Triton at %s", settings.grpc_url)
    deadline = time.monotonic() + settings.startup_timeout_s
    if wait_until_ready(settings.grpc_url, models, deadline=deadline, call_timeout_s=settings.ready_timeout_s) is None:
        raise TritonStartError(
            f"external Triton at {settings.grpc_url} was not ready within {settings.startup_timeout_s:.0f} s"
        )
    yield settings.grpc_url
