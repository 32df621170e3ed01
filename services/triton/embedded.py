"""Run the ``tritonserver`` binary that ships in the nvidia-pytriton wheel on ``triton_models/``.

The wheel carries Triton 2.51 with only the Python backend. Its stub for our Python version lives
outside the backend folder, so we assemble a backend directory of symlinks under the cache and point
the server at it, with this interpreter's ``bin`` first on PATH so the stub finds our packages.

Supervision: the process that starts the server (``medgate serve``'s parent, which also forks the gateway
workers) owns it. It starts tritonserver in a process group of its own, so the Python-backend stubs can be
killed with it, and names the Python backend's shared-memory regions after itself (``medgate_triton_<pid>_<n>_``)
so they can be unlinked. :meth:`EmbeddedTriton.supervise` watches from a thread: when the server exits or
has not answered a liveness probe for ``hung_restart_s``, its whole process group is killed, its regions are
unlinked, and it is started again after a pause that doubles per failed start (``restart_backoff_s`` up to
``restart_backoff_max_s``). The gateway workers do not restart anything: each watches Triton itself
(:mod:`services.triton.watch`), answers UNAVAILABLE at once while it is down and picks it up again when it is
back, which also serves an external Triton (``MEDGATE_TRITON_URL``) that someone else restarts. Every exit
path kills the group and unlinks the regions; a parent killed with SIGKILL leaves its regions to the next
start, which removes those of dead owners. :meth:`EmbeddedTriton.stop` records the server's exit status,
and leaving the ``with`` block of a server that stopped with an error raises :class:`TritonFailed`, so
``medgate serve`` exits non-zero.

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
import importlib.util
import itertools
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.settings import PROJECT_ROOT, TritonSettings
from services.triton.orphans import remove_orphans

log = logging.getLogger("medgate.triton")
server_log = logging.getLogger("medgate.triton.server")


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


class TritonFailed(TritonStartError):
    """The server stopped with an error status (``medgate serve`` exits non-zero; one line, no traceback)."""


# The Python backend's shared-memory regions (64 MiB each, one per model instance) are named with this prefix,
# our pid and a number per start, so the regions of one server can be unlinked after its death.
SHM_PREFIX = "medgate_triton"
_SHM_OWNER = re.compile(rf"^{SHM_PREFIX}_(\d+)_\d+_")
_DEV_SHM = Path("/dev/shm")
_STARTS = itertools.count(1)  # one number per server start in this process (tests start several)
# A server that ran this long before it died gets the first restart pause again, not the doubled one.
_STABLE_S = 60.0


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) in process group ``pgid``, from /proc: a server and its Python-backend stubs."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in {"Z", "X"}:
            members.append(int(entry.name))
    return members


def server_regions(prefix: str, directory: Path = _DEV_SHM) -> list[Path]:
    """The shared-memory regions of the server whose stubs were given ``prefix``."""
    with contextlib.suppress(OSError):
        return sorted(p for p in directory.iterdir() if p.name.startswith(prefix))
    return []


def remove_stale_server_regions(directory: Path = _DEV_SHM) -> int:
    """Unlink Python-backend regions of servers whose owner process is gone (it was killed with SIGKILL)."""
    return remove_orphans(directory, _SHM_OWNER)


def describe_status(code: int | None) -> str:
    """``status 1`` or ``SIGKILL`` for a Popen return code."""
    if code is None:
        return "no status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"status {code}"


def _ended(code: int | None) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    killed = code is not None and code < 0
    return f"was killed by {describe_status(code)}" if killed else f"exited with {describe_status(code)}"


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


def _dying_with_parent(command: list[str]) -> list[str]:
    """``command`` run so that the kernel SIGTERMs it when its parent dies (Linux), so no orphan keeps the ports.

    util-linux's ``setpriv --pdeathsig`` sets it and execs the server. Not a ``preexec_fn``: that makes
    subprocess fork and run Python in the child while gRPC's threads run in the parent, and gRPC's fork
    handlers then restart a poller in the child whose epoll descriptor close_fds closes: the child aborted
    (SIGABRT, "epoll_wait error: Bad file descriptor") whenever tests had served gRPC before the start.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


class EmbeddedTriton:
    """The tritonserver child: start, wait until every model is READY, forward its log, supervise, stop.

    ``returncode``: the status the server stopped with at :meth:`stop` (None before); ``restarts``: how many
    times the supervisor started it again; ``pgid``: its process group (its pid), which the stubs share.
    """

    def __init__(self, settings: TritonSettings, *, cache_dir: Path | None = None) -> None:
        self.settings = settings
        self.cache_dir = cache_dir or PROJECT_ROOT / ".cache" / "triton-backends"
        self._process: subprocess.Popen[str] | None = None
        self._log_tail: deque[str] = deque(maxlen=60)
        self._log_thread: threading.Thread | None = None
        self._start = 0
        self._started_at = 0.0
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.returncode: int | None = None
        self._last_status: int | None = None
        self.restarts = 0
        self.pgid = 0

    @property
    def shm_prefix(self) -> str:
        """The prefix of this start's Python-backend shared-memory regions."""
        return f"{SHM_PREFIX}_{os.getpid()}_{self._start}_"

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
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={s.log_verbose}",
            f"--exit-timeout-secs={s.exit_timeout_s}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            *self.poll_args(),
            *shlex.split(s.extra_args),
        ]

    def poll_args(self) -> list[str]:
        """Poll mode when triton.repository_poll_s > 0: a version landing in the repository loads without a restart."""
        seconds = self.settings.repository_poll_s
        if seconds <= 0:
            return []
        return ["--model-control-mode=poll", f"--repository-poll-secs={max(1, round(seconds))}"]

    def start(self) -> None:
        if self._process is not None:
            return
        self._stopping.clear()
        remove_stale_server_regions()
        self._spawn()

    def _spawn(self) -> None:
        self._start = next(_STARTS)
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
        # A session (and process group) of its own: the stubs it forks share it, so one killpg ends them all, and
        # a Ctrl-C on the terminal reaches only us (we stop it in order). PDEATHSIG covers a parent killed with
        # SIGKILL; the kernel sends it when the *thread* that forked exits, so a restart is forked by the
        # supervisor thread, which lives until stop().
        process = subprocess.Popen(
            _dying_with_parent(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._process, self.pgid, self._started_at = process, process.pid, time.monotonic()
        self._log_thread = threading.Thread(target=self._forward_log, args=(process,), name="triton-log", daemon=True)
        self._log_thread.start()

    def _forward_log(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if not line:
                continue
            self._log_tail.append(line)
            level = logging.WARNING if line[:1] in {"E", "W"} else logging.INFO
            server_log.log(level, "%s", line)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def failed(self) -> bool:
        """Whether the server stopped with an error status (after :meth:`stop`)."""
        return self.returncode not in (None, 0)

    def log_tail(self) -> str:
        return "\n".join(self._log_tail)

    def _await_ready(self, models: list[str] | None) -> list[str] | None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        return wait_until_ready(
            self.settings.grpc_url,
            models,
            deadline=deadline,
            alive=lambda: self.running and not self._stopping.is_set(),
            call_timeout_s=self.settings.ready_timeout_s,
        )

    def wait_ready(self, models: list[str] | None = None) -> list[str]:
        """Block until the server and every model are READY; returns the ready model names."""
        ready = self._await_ready(models)
        if ready is None:
            code = self._process.poll() if self._process else None
            detail = _ended(code) if code is not None else "did not become ready in time"
            self.stop()
            raise TritonStartError(f"tritonserver {detail}; last log lines:\n{self.log_tail()}")
        return ready

    # --- supervision ---------------------------------------------------------------------------

    def supervise(self) -> None:
        """Watch the server from a thread of this process; restart it when it exits or stops answering."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="triton-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        # This thread forked the restarted servers, and the kernel sends their PDEATHSIG when it ends: a bug
        # here must not end it (and them) silently.
        while not self._stopping.is_set():
            try:
                self._supervise_until_stopped()
                return
            except Exception:
                log.exception("the Triton supervisor failed; it starts over")
                self._stopping.wait(1.0)

    def _supervise_until_stopped(self) -> None:
        s = self.settings
        pause = s.restart_backoff_s
        while not self._stopping.is_set():
            why = self._until_lost()
            if why is None:
                return
            if time.monotonic() - self._started_at >= _STABLE_S:
                pause = s.restart_backoff_s
            log.error("tritonserver %s; killing its process group and starting it again in %.1f s", why, pause)
            self._reap()
            while True:
                if self._stopping.wait(pause):
                    return
                pause = min(pause * 2, s.restart_backoff_max_s)
                try:
                    self._spawn()
                except Exception as exc:  # the binary or its folder went away: keep trying, say why
                    log.error("tritonserver could not be started again (%s); next try in %.1f s", exc, pause)
                    continue
                self.restarts += 1
                if self._await_ready(None) is not None:
                    log.warning("tritonserver is back (restart %d): every model READY", self.restarts)
                    break
                if self._stopping.is_set():
                    return
                code = self._process.poll() if self._process else None
                detail = _ended(code) if code is not None else "was not ready in time"
                log.error("tritonserver %s after a restart; next try in %.1f s", detail, pause)
                self._reap()

    def _until_lost(self) -> str | None:
        """Block until the server exits or hangs (returns why) or stop() is called (None)."""
        s = self.settings
        process = self._process
        if process is None:
            return "is not running"
        host = f"[{s.host}]" if ":" in s.host else s.host
        url = f"http://{host}:{s.http_port}/v2/health/live"
        timeout = max(s.probe_timeout_s, s.hung_restart_s / 5)  # a few long probes: a slow server is not a hung one
        answered, next_probe = time.monotonic(), 0.0
        while not self._stopping.wait(0.1):
            code = process.poll()
            if code is not None:
                return _ended(code)
            if time.monotonic() < next_probe:
                continue
            next_probe = time.monotonic() + s.probe_interval_s
            if _live(url, timeout):
                answered = time.monotonic()
            elif time.monotonic() - answered >= s.hung_restart_s:
                return f"has not answered a liveness probe for {time.monotonic() - answered:.0f} s"
        return None

    def _reap(self) -> int | None:
        """Kill what is left of the current server's process group, wait for it, unlink its regions; its status."""
        process, self._process = self._process, None
        if process is None:
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # The stubs were reparented when the server died; they are gone once no live member of the group is left.
        gone_by = time.monotonic() + 5.0
        while group_members(process.pid) and time.monotonic() < gone_by:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.02)
        left = group_members(process.pid)
        if left:
            log.error("tritonserver's process group %d still has %d processes after SIGKILL", process.pid, len(left))
        for region in server_regions(self.shm_prefix):
            with contextlib.suppress(OSError):
                region.unlink()
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        self._last_status = process.returncode
        return process.returncode

    def stop(self) -> None:
        """Stop supervising, SIGTERM the server (it drains for exit_timeout_s), then kill its group and unlink."""
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()
        process = self._process
        if process is None:  # never started, or dead and not back yet: its last status stands
            self.returncode = self._last_status if self.returncode is None else self.returncode
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.settings.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0f s; killing it", self.settings.stop_grace_s)
        self.returncode = self._reap()
        level = logging.INFO if self.returncode == 0 else logging.ERROR
        log.log(level, "tritonserver stopped (%s)", describe_status(self.returncode))

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is None and self.failed:
            raise TritonFailed(
                f"tritonserver {_ended(self.returncode)}; its last log lines:\n" + "\n".join(list(self._log_tail)[-10:])
            )


# The server is on loopback: never through an HTTP proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _live(url: str, timeout_s: float) -> bool:
    """Triton's HTTP liveness endpoint answered 200 within ``timeout_s``."""
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except Exception:
        return False


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
        with EmbeddedTriton(settings) as server:
            server.supervise()
            yield settings.grpc_url
        return
    log.info("using the external Triton at %s", settings.grpc_url)
    deadline = time.monotonic() + settings.startup_timeout_s
    if wait_until_ready(settings.grpc_url, models, deadline=deadline, call_timeout_s=settings.ready_timeout_s) is None:
        raise TritonStartError(
            f"external Triton at {settings.grpc_url} was not ready within {settings.startup_timeout_s:.0f} s"
        )
    yield settings.grpc_url
