"""A throwaway Orthanc (Debian's ``orthanc`` package) for tests and benchmarks: a generated JSON config on free ports.

Orthanc 1.10 runs as a plain process (``Orthanc config.json``) with its storage and index in a
temporary folder, no plugins, REST on loopback without authentication, and the DICOM peers it should
know registered as modalities. ``stop()`` and ``start()`` again keep the same ports and storage, which
is how a test takes "the PACS" down and brings it back. REST: ``/instances`` (POST a file, GET the list),
``/tools/find``, ``/instances/{id}/tags?simplify``.

``python -m tests.orthanc`` starts one and prints its ports until interrupted.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import Any

BINARY = "Orthanc"
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)


class OrthancUnavailable(RuntimeError):
    """No Orthanc binary on this machine (Debian: apt-get install orthanc)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary() -> str:
    for candidate in (shutil.which(BINARY), "/usr/sbin/Orthanc", "/usr/bin/Orthanc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise OrthancUnavailable("no Orthanc binary on PATH or in /usr/sbin (apt-get install orthanc)")


def find_dicomweb_plugin() -> str:
    """Debian's orthanc-dicomweb plugin (STOW-RS, QIDO-RS, WADO-RS)."""
    for candidate in DICOMWEB_PLUGINS:
        if os.path.isfile(candidate):
            return candidate
    raise OrthancUnavailable(
        f"no DICOMweb plugin at {' or '.join(DICOMWEB_PLUGINS)} (apt-get install orthanc-dicomweb)"
    )


class Orthanc:
    """One Orthanc server; ``modalities`` are ``{name: (AE, host, port)}`` it may talk to (and accept from)."""

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        check_called_aet: bool = True,
        dicomweb: bool = False,
        root: Path | None = None,
    ) -> None:
        self.binary = find_binary()
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.check_called_aet = check_called_aet
        self.plugins = [find_dicomweb_plugin()] if dicomweb else []
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="medgate-orthanc-"))
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base (``MEDGATE_DICOM_STOW_URL``) when started with ``dicomweb=True``."""
        return f"{self.url}/dicom-web"

    @property
    def destination(self) -> str:
        """``AE@host:port`` as MEDGATE_DICOM_DESTINATION takes it."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "medgate-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            # A peer must name our AE title; a wrong one is rejected-permanent (what "refuses for good" looks like).
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": self.plugins,
            "DicomWeb": {"Enable": bool(self.plugins), "Root": "/dicom-web/"},
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 10,
            "StableAge": 60,
        }

    def start(self, *, timeout_s: float = 60.0) -> None:
        if self.process is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--logdir=" + str(self.root), str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"Orthanc exited at start-up; see {self.log_path}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.get("/system").get("DicomAet") == self.aet:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # REST -----------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as answer:
            data = answer.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return self._call("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, data: bytes) -> Any:
        """POST /instances: store a DICOM file directly (not through DIMSE)."""
        return self._call("POST", "/instances", data, "application/dicom")

    def find_instances(self, **query: str) -> list[dict[str, Any]]:
        """/tools/find at instance level, expanded (MainDicomTags, ParentSeries, ...)."""
        return list(self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True}))

    def lookup(self, uid: str, level: str) -> str | None:
        """Orthanc's id of the study, series or instance (``level`` "Study", ...) with DICOM UID ``uid``."""
        for entry in self._call("POST", "/tools/lookup", uid.encode(), "text/plain") or []:
            if entry.get("Type") == level:
                return str(entry["ID"])
        return None

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances"))


def main() -> int:
    with Orthanc() as orthanc:
        print(f"Orthanc {orthanc.aet}: DICOM 127.0.0.1:{orthanc.dicom_port}, REST {orthanc.url}; Ctrl-C to stop")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
