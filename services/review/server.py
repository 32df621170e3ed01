"""Review server lifecycle: the store, the servicer, housekeeping (expiry, output.json), on the shared RPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.audit import AuditLog
from services.metrics import REVIEW_QUEUE_DEPTH
from services.review.completion import CompletionConfig, VerifiedDicom
from services.review.flows import load_flows
from services.review.output import flush_outputs
from services.review.servicer import ReviewServicer
from services.review.store import open_store
from services.review.web.app import ReviewPage
from services.review.web.listener import WebListener
from services.rpc.server import RpcServer
from services.settings import ReviewSettings, SecuritySettings

log = logging.getLogger("medgate.review")

REVIEW_SERVICE = pb.DESCRIPTOR.services_by_name["Review"].full_name


class ReviewServer:
    """One review server per SQLite file (its leases assume a single owner process), or several on one
    PostgreSQL database (``review.store_url``): replicas that serve the same flows."""

    def __init__(
        self,
        settings: ReviewSettings,
        security: SecuritySettings | None = None,
        *,
        verified: CompletionConfig | None = None,
    ) -> None:
        """``security`` None: plaintext, no tokens (loopback tools and tests that do not exercise security).

        ``verified``: where completed loops' verified DICOM results go (``completion.config_from``); None
        writes none (loops with a DICOM source then stay pending in the store until a server that has it).
        """
        self.settings = settings
        self.flows = load_flows(settings.flows_file)
        self.store = open_store(settings)
        self.executor = ThreadPoolExecutor(settings.threads, thread_name_prefix="medgate-review")
        self.servicer = ReviewServicer(
            self.store, self.flows, self.executor, max_in_flight_per_reviewer=settings.max_in_flight_per_reviewer
        )
        self.audit = AuditLog.from_settings(security, application="medgate-review") if security is not None else None
        self.rpc = RpcServer(
            host=settings.host,
            port=settings.port,
            logger="medgate.review",
            default_deadline_s=None,  # case streams live for hours; callers set their own deadlines
            grace_period_s=settings.grace_period_s,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Reviewer streams idle for long stretches; keepalive pings find dead peers.
                ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", settings.min_ping_interval_ms),
            ],
            security=security,
            audit=self.audit,
        )
        self.rpc.add(REVIEW_SERVICE, pb_grpc.add_ReviewServicer_to_server, self.servicer)
        self.port = 0
        # The reviewer page needs tokens to know who reviews: off when this server runs without them.
        self.page: ReviewPage | None = None
        if settings.web_enabled and security is not None and security.auth:
            self.page = ReviewPage(
                self.servicer,
                security,
                self.audit,
                idle_timeout_s=settings.web_idle_timeout_s,
                secure_cookie=security.tls,
                settings=settings,
            )
        self.security = security
        self.web: WebListener | None = None
        self.web_port = 0
        self._housekeeping: asyncio.Task[None] | None = None
        # Verified DICOM results: built on their own thread (a SEG of a large image takes a while), woken by
        # each completed loop and every retry interval.
        self.verified = VerifiedDicom(self.store, self.flows, verified) if verified is not None else None
        self._verified_task: asyncio.Task[None] | None = None
        self._verified_unlisten: Callable[[], None] | None = None
        self._verified_wake = asyncio.Event()
        self._verified_executor = ThreadPoolExecutor(1, thread_name_prefix="medgate-review-dicom")
        if self.verified is not None:
            self.servicer.on_completed = self._verified_wake.set

    async def start(self, *, port: int | None = None, web_port: int | None = None) -> int:
        """Serve gRPC (and the reviewer page); a gRPC port of 0 gives the page a free port too, unless ``web_port``."""
        self.servicer.attach(asyncio.get_running_loop())
        if self.audit is not None:
            await self.audit.application_started()  # raises when the trail cannot be written: no audit, no service
        self.port = await self.rpc.start(port=port)
        for name in ("", REVIEW_SERVICE):
            await self.rpc.set_health(name, True)
        if self.page is not None and self.security is not None:
            grpc_port = self.settings.port if port is None else port
            if web_port is None:
                web_port = 0 if grpc_port == 0 else self.settings.web_port
            self.web = WebListener(self.page.app, host=self.settings.web_host, port=web_port, security=self.security)
            self.web_port = await self.web.start()
        self._housekeeping = asyncio.create_task(self._housekeep())
        if self.verified is not None:
            # Decisions made elsewhere (the reviewer page, another replica) end a lease too: any ended lease wakes
            # the worker, which then looks for completed loops (an indexed query).
            loop = asyncio.get_running_loop()
            self._verified_unlisten = self.store.listen(
                lambda event: (
                    loop.call_soon_threadsafe(self._verified_wake.set) if event.reviewers or event.everything else None
                )
            )
            self._verified_task = asyncio.create_task(self._verify_forever(self.verified))
        log.info("review service on %s:%d with flows %s", self.settings.host, self.port, ", ".join(self.flows))
        return self.port

    async def _housekeep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self.executor, self.store.expire)
                await loop.run_in_executor(self.executor, lambda: flush_outputs(self.store, self.flows))
                for name in self.flows:
                    depth = await loop.run_in_executor(self.executor, self.store.queue_depth, name)
                    REVIEW_QUEUE_DEPTH.labels(flow=name).set(depth)
            except Exception:
                log.warning("review housekeeping failed", exc_info=True)
            await asyncio.sleep(self.settings.housekeeping_interval_s)

    async def _verify_forever(self, verified: VerifiedDicom) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._verified_wake.clear()
            try:
                await loop.run_in_executor(self._verified_executor, verified.run_once)
            except Exception as exc:  # the store or a bug; the loops stay pending and are tried again
                log.warning("verified DICOM results: a round failed (%s)", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._verified_wake.wait(), timeout=verified.config.retry_interval_s)

    async def stop(self) -> None:
        if self._verified_unlisten is not None:
            self._verified_unlisten()
        if self._verified_task is not None:
            self._verified_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._verified_task
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.web is not None and self.page is not None:
            self.page.closing.set()  # live page streams end, so the listener need not wait for them
            await self.web.stop()
        self.servicer.detach()
        await self.rpc.stop()
        if self.audit is not None:
            await self.audit.application_stopped()
        self._verified_executor.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        self.store.close()
