"""Gateway lifecycle: one RPC server (services.rpc) per worker process, model health, graceful stop.

Who watches Triton: every worker, on its own (:mod:`services.triton.watch`): it answers UNAVAILABLE at once
and reports NOT_SERVING the moment its watch finds Triton dead or hung, and SERVING again once Triton is back
and its shared-memory regions are registered again. Only the process that started an embedded Triton (the
parent of the workers; :func:`services.triton.embedded.triton_for`) restarts it, so a restart is one restart
however many workers there are, and an external Triton is watched the same way without being restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from medgate.v1 import report_pb2, report_pb2_grpc
from services.audit import AuditLog
from services.gateway.report_servicer import ReportServicer
from services.gateway.routing import ReviewRouter
from services.gateway.servicer import InferenceServicer
from services.http.server import HttpServer
from services.logs import configure_logging
from services.metrics import cleanup_multiprocess, prepare_multiprocess, serve_metrics
from services.review.completion import config_from
from services.review.flows import load_flows
from services.review.outbox import Outbox
from services.review.server import ReviewServer
from services.rpc.server import RpcServer
from services.rpc.tls import check_plaintext_allowed
from services.settings import Settings
from services.triton.client import TritonModels
from services.triton.impression import ImpressionModel

log = logging.getLogger("medgate.gateway")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
REPORT_SERVICE = report_pb2.DESCRIPTOR.services_by_name["Report"].full_name
REPORT_ROLE = "impression"


def metrics_tls(settings: Settings) -> dict[str, Any]:
    """The metrics endpoint is a listener too: the same certificate as gRPC, and mutual TLS when it is on."""
    security = settings.security
    if not security.tls:
        check_plaintext_allowed(settings.gateway.host, security)
        return {}
    client_ca = security.client_ca_file if security.require_client_cert else None
    return {"tls": (security.cert_file, security.key_file), "client_ca": client_ca}


def health_name(role: str) -> str:
    """Health service name of one model role, e.g. ``medgate.v1.Inference/classifier``."""
    service = REPORT_SERVICE if role == REPORT_ROLE else INFERENCE_SERVICE
    return f"{service}/{role}"


class GatewayServer:
    """One worker's server: ``await start()``, then ``await wait()``; ``await stop()`` drains in-flight calls."""

    def __init__(self, settings: Settings, triton_url: str, *, serve_metrics: bool = True) -> None:
        self.settings = settings
        self.serve_metrics = serve_metrics
        self.metrics_port = 0
        self.models = TritonModels.from_settings(triton_url, settings)
        self.executor = ThreadPoolExecutor(settings.gateway.cpu_threads, thread_name_prefix="medgate-cpu")
        gateway = settings.gateway
        self.audit = AuditLog.from_settings(settings.security, application="medgate-gateway")
        self.rpc = RpcServer(
            host=gateway.host,
            port=gateway.port,
            logger="medgate.gateway",
            default_deadline_s=gateway.default_deadline_s,
            grace_period_s=gateway.grace_period_s,
            options=[
                ("grpc.max_receive_message_length", gateway.max_receive_message_bytes),
                ("grpc.max_send_message_length", gateway.max_send_message_bytes),
                # Several worker processes share one port; the kernel spreads connections over them.
                ("grpc.so_reuseport", 1),
                *(
                    [
                        ("grpc.max_connection_age_ms", int(gateway.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(gateway.max_connection_age_grace_s * 1000)),
                    ]
                    if gateway.max_connection_age_s > 0
                    else []
                ),
            ],
            maximum_concurrent_rpcs=gateway.max_concurrent_rpcs,
            security=settings.security,
            audit=self.audit,
        )
        self.router: ReviewRouter | None = None
        if settings.review.enabled:
            self.router = ReviewRouter(
                load_flows(settings.review.flows_file),
                settings.review.target,
                self.executor,
                timeout_s=settings.review.route_timeout_s,
                outbox=Outbox(settings.review.outbox_dir, max_bytes=settings.review.outbox_max_bytes),
                retry_interval_s=settings.review.outbox_retry_interval_s,
                max_message_bytes=settings.review.route_max_message_bytes,
                security=settings.security,
                dicom_source_max_bytes=settings.review.dicom_source_max_bytes,
            )
        self.rpc.add(
            INFERENCE_SERVICE,
            pb_grpc.add_InferenceServicer_to_server,
            InferenceServicer(settings, self.models, self.executor, self.router),
        )
        self.report_model: ImpressionModel | None = None
        if settings.report.enabled and settings.report.model:
            self.report_model = ImpressionModel.from_settings(triton_url, settings, watch=self.models.watch)
            self.rpc.add(
                REPORT_SERVICE,
                report_pb2_grpc.add_ReportServicer_to_server,
                ReportServicer(settings, self.report_model),
            )
        # The HTTP/JSON face (services/http): its calls come in through this server's chain like any gRPC call.
        self.http = HttpServer(settings) if gateway.http_enabled else None
        self.http_port = 0
        self.port = 0
        self._health_task: asyncio.Task[None] | None = None

    async def start(self, *, port: int | None = None) -> int:
        """Check every model's contract, then bind and serve; returns the bound port."""
        await self.models.connect()
        if self.report_model is not None:
            await self.report_model.connect()
        await self.audit.application_started()  # raises when the trail cannot be written: no audit, no service
        if self.http is not None:
            self.http.bind_loopback(self.rpc.server)
        self.port = await self.rpc.start(port=port)
        if self.http is not None:
            self.http_port = await self.http.start(any_port=(self.settings.gateway.port if port is None else port) == 0)
        if self.serve_metrics:
            self.metrics_port = serve_metrics(
                self.settings.gateway.host, self.settings.gateway.metrics_port, **metrics_tls(self.settings)
            )
        await self._update_health()
        self.models.watch.add_listener(self._triton_changed)
        self._health_task = asyncio.create_task(self._poll_health())
        if self.router is not None:
            self.router.start_retrying()
        served = "medgate.v1.Inference and medgate.v1.Report" if self.report_model else "medgate.v1.Inference"
        log.info("gateway serving %s on %s:%d", served, self.settings.gateway.host, self.port)
        return self.port

    async def _update_health(self) -> None:
        states = await self.models.ready()
        for role, ready in states.items():
            await self.rpc.set_health(health_name(role), ready)
        overall = bool(states) and all(states.values())
        await self.rpc.set_health(INFERENCE_SERVICE, overall)
        if self.report_model is not None:
            report = await self.report_model.ready()
            await self.rpc.set_health(health_name(REPORT_ROLE), report)
            await self.rpc.set_health(REPORT_SERVICE, report)
            overall = overall and report
        await self.rpc.set_health("", overall)

    async def _triton_changed(self, up: bool) -> None:
        """The watch found Triton down or back: health follows at once, not at the next poll."""
        await self._update_health()

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gateway.health_poll_interval_s)
            try:
                await self._update_health()
            except Exception:
                log.warning("health poll failed", exc_info=True)

    async def wait(self) -> None:
        await self.rpc.wait()

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.http is not None:  # first: its requests in flight finish through the gRPC server
            await self.http.stop()
        await self.rpc.stop()
        await self.audit.application_stopped()
        await self.models.close()
        if self.report_model is not None:
            await self.report_model.close()
        if self.router is not None:
            await self.router.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int, trim_threshold: int) -> bool:
    """Keep multi-megabyte buffers in glibc's heap instead of a fresh mmap for each one.

    Every request allocates and frees several buffers of 1-30 MB (the message, decoded pixels,
    the model square). By default glibc maps each one anew and unmaps it on free, so every request
    page-faults them in again: measured on RG1_UNCI.dcm (7 MB), decode and letterbox took 35-70 ms
    instead of 19-22 ms. Returns False where this is not glibc (nothing changes there).
    """
    if mmap_threshold <= 0:
        return False
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


async def serve_worker(settings: Settings, triton_url: str, *, with_review: bool = False, metrics: bool = True) -> None:
    """Run one gateway worker (and, in a single-process stack, the review service) until a signal."""
    tune_allocator(settings.gateway.malloc_mmap_threshold_bytes, settings.gateway.malloc_trim_threshold_bytes)
    # The review service runs here only when the gateway routes to this machine's (review.url empty).
    local_review = with_review and settings.review.enabled and not settings.review.url
    verified = config_from(settings, node_here=True) if local_review else None  # `medgate serve` runs the node here
    review = ReviewServer(settings.review, settings.security, verified=verified) if local_review else None
    if review is not None:
        await review.start()
    server = GatewayServer(settings, triton_url, serve_metrics=metrics)
    try:
        await server.start()
        try:
            await _until_signal()
        finally:
            await server.stop()
    finally:
        if review is not None:
            await review.stop()


async def serve_review(settings: Settings, *, node_here: bool = False) -> None:
    """The review service on its own; ``node_here``: beside ``medgate serve``'s DICOM node (several workers)."""
    review = ReviewServer(settings.review, settings.security, verified=config_from(settings, node_here=node_here))
    await review.start()
    try:
        await _until_signal()
    finally:
        await review.stop()


def _configure_child_logging(settings: Settings) -> None:
    configure_logging(settings.gateway.log_format)


def _worker_main(settings: Settings, triton_url: str) -> None:
    _configure_child_logging(settings)
    asyncio.run(serve_worker(settings, triton_url, metrics=False))


def _review_main(settings: Settings) -> None:
    _configure_child_logging(settings)
    asyncio.run(serve_review(settings, node_here=True))


def run_gateway(settings: Settings, triton_url: str) -> None:
    """Serve with ``settings.gateway.workers`` processes on one port (plus the review service); blocks until a signal.

    One worker: gateway and review service share one process and event loop. Several: the review
    service gets its own process, since its SQLite store has exactly one owner.
    """
    workers = max(1, settings.gateway.workers)
    if workers == 1:
        asyncio.run(serve_worker(settings, triton_url, with_review=True))
        return
    if settings.gateway.port == 0:
        raise ValueError("several gateway workers need a fixed port (MEDGATE_GATEWAY_PORT)")
    metrics_dir = prepare_multiprocess()  # before the workers start: they write their samples there
    serve_metrics(
        settings.gateway.host, settings.gateway.metrics_port, multiprocess_dir=metrics_dir, **metrics_tls(settings)
    )
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(settings, triton_url), name=f"medgate-gateway-{i}", daemon=False)
        for i in range(workers)
    ]
    if settings.review.enabled and not settings.review.url:
        processes.insert(0, context.Process(target=_review_main, args=(settings,), name="medgate-review"))
    for process in processes:
        process.start()
    stop = False

    def _forward(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        for process in processes:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, _forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for process in processes:
            process.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup_multiprocess(metrics_dir)
    failed = [f"{p.name} ({_exit_status(p.exitcode)})" for p in processes if p.exitcode != 0]
    if failed:
        # One line and a non-zero exit for `medgate serve` (SystemExit passes the CLI's handlers, and leaving
        # triton_for on the way out still stops Triton in order).
        raise SystemExit(f"error: {', '.join(failed)} stopped with an error")


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"
