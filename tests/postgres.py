"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temporary folder, a free port, torn down after.

Debian's ``postgresql`` package (binaries under ``/usr/lib/postgresql/<version>/bin``, installed by
``.ci/run``). ``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user, in
a folder that user owns; as anyone else, as that user. Trust authentication on 127.0.0.1 and a socket
in the folder: nothing outside this machine can reach it.

``python -m tests.postgres`` starts one and prints its URL until interrupted (for
``bench/bench_review.py --store-url``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

BIN_GLOB = "/usr/lib/postgresql/*/bin"
# The server's own settings for tests: enough connections for two replicas' pools, their listeners and
# the tests' own stores; fsync stays on (a kill -9 in these tests is of a review process, but the
# timings should be those of a real commit).
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (Debian: apt-get install postgresql)."""


def find_bin_dir() -> Path:
    """The newest installed version's bin folder with initdb and pg_ctl."""
    candidates = sorted(
        (Path(p) for p in glob.glob(BIN_GLOB)),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0],
    )
    for candidate in reversed(candidates):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).parent
    raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) in {BIN_GLOB} or on PATH")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL server in a temporary folder; :meth:`create_database` gives each test its own database."""

    def __init__(self, *, bin_dir: Path | None = None, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.root: Path | None = None
        self.port = 0
        self._as_postgres = os.geteuid() == 0

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the cluster is not started"
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="medgate-pg-"))
        if self._as_postgres:
            user = pwd.getpwnam("postgres")  # initdb refuses root; the folder must be the postgres user's
            os.chown(self.root, user.pw_uid, user.pw_gid)
        os.chmod(self.root, 0o700)
        done = self._run(
            "initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"
        )
        if done.returncode != 0:
            self._remove()
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        last_error = ""
        for _ in range(3):  # a free port can be taken between asking and binding: try another
            self.port = free_port()
            options = " ".join(
                [f"-p {self.port}", f"-k {self.root}", *(f"-c {k}={v}" for k, v in self.settings.items())]
            )
            done = self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-o",
                options,
                "-l",
                str(self.root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            )
            if done.returncode == 0:
                return
            last_error = f"{done.stdout}\n{done.stderr}\n{self.log_tail()}"
        self._remove()
        raise RuntimeError(f"pg_ctl start failed:\n{last_error}")

    def log_tail(self, lines: int = 20) -> str:
        if self.root is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: lowercase letters, digits and underscores")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.root is None:
            return
        if self.data_dir.exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", timeout=60)
        self._remove()

    def _remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main() -> int:
    """Start a server with a ``medgate`` database, print its URL, stop it on SIGINT or SIGTERM."""
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    with PostgresCluster() as cluster:
        print(cluster.create_database("medgate"), flush=True)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
