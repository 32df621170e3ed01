"""Prometheus metrics: where the time goes per stage, per model and per status code. No patient data in labels.

With several gateway worker processes the parent sets ``PROMETHEUS_MULTIPROC_DIR`` before they
start; each worker writes its samples there and the parent serves the sum on one port.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess

log = logging.getLogger("medgate.metrics")

# From 1 ms to 30 s: decode of a small PNG up to a JPEG 2000 radiograph plus LiteMedSAM on a CPU.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("decode", "preprocess", "triton", "encode", "total")

STAGE_SECONDS = Histogram(
    "medgate_stage_seconds",
    "Time per request and stage on the gateway (decode, preprocess, triton, encode, total).",
    ["rpc", "model", "stage", "input_kind"],
    buckets=_LATENCY_BUCKETS,
)
TRITON_SECONDS = Histogram(
    "medgate_triton_request_seconds",
    "Time of one Triton inference call as the gateway sees it, per model.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
REQUESTS = Counter("medgate_requests", "Finished RPCs (and stream items) by status code.", ["rpc", "code"])
REVIEW_ROUTED = Counter("medgate_review_routed", "Answers routed to human review, per flow.", ["flow"])
REVIEW_OUTBOX_PENDING = Gauge(
    "medgate_review_outbox_pending",
    "Cases kept on the gateway's disk because the review service could not be reached.",
    multiprocess_mode="livemax",
)
REVIEW_QUEUE_DEPTH = Gauge(
    "medgate_review_queue_depth",
    "Reviewer slots waiting for a lease, per flow.",
    ["flow"],
    multiprocess_mode="livemax",
)

# The DICOM node's outbox (services/dicom/node) and the review service's verified results: a PACS that is down
# shows as pending results growing and send failures, per destination ("AE@host:port" or the STOW-RS URL).
DICOM_OUTBOX_PENDING = Gauge(
    "medgate_dicom_outbox_pending",
    "Results (SEG, SR) in the DICOM node's outbox not yet delivered, per destination.",
    ["destination"],
    multiprocess_mode="livemax",
)
DICOM_SENT = Counter("medgate_dicom_sent", "Results delivered by the DICOM node, per destination.", ["destination"])
DICOM_SEND_FAILURES = Counter(
    "medgate_dicom_send_failures",
    "Results a destination did not take: retry (tried again later) or refused (moved aside for an operator).",
    ["destination", "outcome"],
)
REVIEW_VERIFIED_DICOM = Counter(
    "medgate_review_verified_dicom",
    "Completed loops' verified DICOM results by outcome: handed-over (to the DICOM node), failed, skipped"
    " (every reviewer rejected the case), waiting (the node's folder could not be written; tried again).",
    ["outcome"],
)

SHADOW_COMPARISONS = Counter(
    "medgate_shadow_comparisons",
    "Answers also computed by a role's candidate version (services/gateway/shadow.py), by outcome:"
    " agree, disagree, error (the candidate failed) or skipped (too many shadow calls in flight).",
    ["role", "serving", "candidate", "outcome"],
)


def observe_stages(rpc: str, model: str, input_kind: str, seconds: dict[str, float]) -> None:
    """``model``: the Triton models the request used, sorted and joined by '+' (e.g. classifier+detector)."""
    for stage, value in seconds.items():
        STAGE_SECONDS.labels(rpc=rpc, model=model, stage=stage, input_kind=input_kind).observe(value)


def prepare_multiprocess() -> Path:
    """Before spawning workers: a fresh directory for their samples, exported in the environment."""
    directory = Path(tempfile.mkdtemp(prefix="medgate-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def cleanup_multiprocess(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def serve_metrics(
    host: str,
    port: int,
    *,
    multiprocess_dir: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    client_ca: Path | None = None,
) -> int:
    """Serve /metrics on ``host:port`` (0 = any free port, negative = disabled); returns the port.

    ``tls`` (certificate chain, key) serves HTTPS like every other listener; ``client_ca`` then also
    asks scrapers for a certificate from that CA (mutual TLS).
    """
    if port < 0:
        return 0
    registry: CollectorRegistry | None = None
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"certfile": str(tls[0]), "keyfile": str(tls[1])}
        if client_ca is not None:
            options.update(client_cafile=str(client_ca), client_auth_required=True)
    if registry is not None:
        options["registry"] = registry
    server, _thread = start_http_server(port, addr=host, **options)
    bound = int(server.server_address[1])
    log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, bound)
    return bound
