"""The DICOM node end to end (``make bench-dicom``): a 50-instance series by C-STORE, SEG and SR stored in Orthanc.

``medgate serve`` runs as ``make run`` serves it (embedded Triton, the gateway with TLS and bearer tokens,
the DICOM node calling it with the inference token) on throwaway development credentials, free ports and
temporary folders; Orthanc (Debian's package, tests/orthanc.py) on free ports is the destination.

1. Warm-up: one instance of another series, until its SEG and SR are in Orthanc (models, highdicom's tables).
2. The series: ``--count`` copies of pydicom-data's ``CT_small.dcm`` (route ``ct-lungs``: segment "lungs";
   ``--source dx`` for RG1_UNCI.dcm, route ``chest-radiograph``: classify, detect, three prompts) with one
   new study and series, sent on one association by pynetdicom's SCU.
3. Orthanc's study is polled every 50 ms until it holds a SEG and an SR per instance.

Reported: the C-STORE receive rate; the end-to-end rate (instances / time from the first C-STORE to the
last result stored); the latency from the series' last instance (its C-STORE answered) to the last result
stored, which includes the quiet period (``--quiet-period``, the node's ``dicom.quiet_period_s``);
per-instance Analyze time seen by the node, and the gateway's own stages for those calls (``dicom_ms`` is
the SEG and SR build). Results go to ``bench/results/dicom.json``. A benchmark, not a test; numbers from a
shared 2-core machine where SCU, node, gateway, Triton and Orthanc share the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt

from bench.stack_security import make_credentials, server_env
from services.dicom.node.scp import no_delay
from services.settings import PROJECT_ROOT
from tests.fixtures import dicom_series, pydicom_data_file
from tests.orthanc import Orthanc

SOURCES = {
    "ct": lambda: Path(str(get_testdata_file("CT_small.dcm"))),
    "dx": lambda: Path(pydicom_data("RG1_UNCI.dcm")),
}


def pydicom_data(name: str) -> str:
    return str(pydicom_data_file(name))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def push(port: int, paths: list[Path]) -> tuple[float, list[float]]:
    """C-STORE every file on one association (all must be Success): when the first was sent, when each was answered."""
    datasets = [pydicom.dcmread(path) for path in paths]  # read before the clock starts
    ae = AE(ae_title="BENCH_SCU")
    for uid in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(uid, [str(datasets[0].file_meta.TransferSyntaxUID)])
    # TCP_NODELAY as a well-configured modality sends (dcmtk: TCP_NODELAY=1); Nagle costs 40 ms per instance.
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGATE", evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
    if not assoc.is_established:
        raise RuntimeError("the DICOM node did not accept the association")
    started = time.monotonic()
    answered = []
    try:
        for number, ds in enumerate(datasets, start=1):
            status = assoc.send_c_store(ds, msg_id=number)
            if int(status.get("Status", -1)) != 0:
                raise RuntimeError(f"C-STORE {number} answered {status.get('Status')}")
            answered.append(time.monotonic())
    finally:
        assoc.release()
    return started, answered


def study_count(orthanc: Orthanc, study_uid: str) -> int:
    orthanc_id = orthanc.lookup(study_uid, "Study")
    return len(orthanc.get(f"/studies/{orthanc_id}/instances")) if orthanc_id else 0


def wait_for_results(orthanc: Orthanc, study_uid: str, expected: int, timeout_s: float) -> float:
    """The monotonic time at which Orthanc's study first held ``expected`` instances."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if study_count(orthanc, study_uid) >= expected:
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"Orthanc did not get {expected} results within {timeout_s:.0f} s")


@contextlib.contextmanager
def medgate_serve(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    script = Path(sys.executable).parent / "medgate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]
    with log_path.open("wb") as log:
        process = subprocess.Popen([*command, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "gateway serving" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"medgate serve did not start; see {log_path}")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        "max": round(ordered[-1], 1),
    }


def log_timings(log_path: Path, uids: set[str], *, skip_analyze: int) -> dict[str, Any]:
    """The node's Analyze time per instance and the gateway's stages for those calls, from the JSON log lines.

    The gateway's access log does not name the instance: its Analyze lines after the first ``skip_analyze``
    (the warm-up) are the series'.
    """
    analyze: list[float] = []
    stages: dict[str, list[float]] = {}
    pattern = re.compile(r"analysed sop_instance_uid=(\S+) route=\S+ in (\d+) ms")
    seen = 0
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            found = pattern.search(str(entry.get("msg", "")))
            if found and found.group(1) in uids:
                analyze.append(float(found.group(2)))
            if entry.get("rpc") == "Analyze":
                seen += 1
                if seen <= skip_analyze:
                    continue
                for stage in ("duration_ms", "decode_ms", "preprocess_ms", "triton_ms", "encode_ms", "dicom_ms"):
                    if stage in entry:
                        stages.setdefault(stage, []).append(float(entry[stage]))
    return {
        "node_analyze_ms": percentiles(analyze),
        "gateway_stages_ms": {stage: percentiles(values) for stage, values in stages.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="instances in the series (default 50)")
    parser.add_argument(
        "--source", choices=sorted(SOURCES), default="ct", help="CT_small.dcm (ct) or RG1_UNCI.dcm (dx)"
    )
    parser.add_argument("--quiet-period", type=float, default=1.0, help="dicom.quiet_period_s (default 1 s)")
    parser.add_argument("--workers", type=int, default=2, help="dicom.analyze_workers (default 2)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "dicom.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="medgate-bench-dicom-") as temporary, Orthanc() as orthanc:
        root = Path(temporary)
        credentials = make_credentials(root / "credentials")
        node_port = free_port()
        env = {
            **os.environ,
            **server_env(credentials, secure=True, audit_dir=root / "audit"),
            "MEDGATE_GATEWAY_PORT": str(free_port()),
            "MEDGATE_GATEWAY_METRICS_PORT": "0",
            "MEDGATE_GATEWAY_LOG_FORMAT": "json",
            "MEDGATE_TRITON_HTTP_PORT": str(free_port()),
            "MEDGATE_TRITON_GRPC_PORT": str(free_port()),
            "MEDGATE_TRITON_METRICS_PORT": str(free_port()),
            "MEDGATE_REVIEW_ENABLED": "false",
            "MEDGATE_REPORT_ENABLED": "false",
            "MEDGATE_DICOM_PORT": str(node_port),
            "MEDGATE_DICOM_DESTINATION": orthanc.destination,
            "MEDGATE_DICOM_QUIET_PERIOD_S": str(args.quiet_period),
            "MEDGATE_DICOM_ANALYZE_WORKERS": str(args.workers),
            "MEDGATE_DICOM_STORE_DIR": str(root / "incoming"),
            "MEDGATE_DICOM_OUTBOX_DIR": str(root / "outbox"),
            "MEDGATE_DICOM_QUARANTINE_DIR": str(root / "quarantine"),
        }
        source = SOURCES[args.source]()
        log_path = root / "serve.log"
        with medgate_serve(env, log_path):
            warm, _, warm_study = dicom_series(source, 1, root / "warm-up")
            push(node_port, warm)
            wait_for_results(orthanc, warm_study, 2, timeout_s=300)

            paths, uids, study = dicom_series(source, args.count, root / "series")
            started, answered = push(node_port, paths)
            done = wait_for_results(orthanc, study, 2 * args.count, timeout_s=600)
        last = answered[-1]
        timings = log_timings(log_path, set(uids), skip_analyze=len(warm))
        results: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
            "source": source.name,
            "instances": args.count,
            "results_stored": 2 * args.count,
            "quiet_period_s": args.quiet_period,
            "analyze_workers": args.workers,
            "receive_instances_per_s": round(args.count / (last - started), 1),
            "end_to_end_instances_per_s": round(args.count / (done - started), 2),
            "last_instance_to_last_result_s": round(done - last, 2),
            "last_instance_to_last_result_without_quiet_period_s": round(done - last - args.quiet_period, 2),
            "first_instance_to_last_result_s": round(done - started, 2),
            **timings,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
