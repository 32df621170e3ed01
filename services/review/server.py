"""Review server lifecycle: the store, the servicer, housekeeping (expiry, output.json), health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.gateway.reflection import enable_reflection
from services.metrics import REVIEW_QUEUE_DEPTH
from services.review.flows import load_flows
from services.review.output import flush_outputs
from services.review.servicer import ReviewServicer
from services.review.store import ReviewStore
from services.settings import ReviewSettings

log = logging.getLogger("medgate.review")

REVIEW_SERVICE = pb.DESCRIPTOR.services_by_name["Review"].full_name


class ReviewServer:
    """One review server per store file (SQLite's leases assume a single owner process)."""

    def __init__(self, settings: ReviewSettings, *, max_message_bytes: int = 64 << 20) -> None:
        self.settings = settings
        settings.store_path.parent.mkdir(parents=True, exist_ok=True)
        self.flows = load_flows(settings.flows_file)
        self.store = ReviewStore(settings.store_path)
        # Few threads: SQLite serialises writers anyway, and each commit waits on fsync.
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="medgate-review")
        self.servicer = ReviewServicer(
            self.store, self.flows, self.executor, max_in_flight_per_reviewer=settings.max_in_flight_per_reviewer
        )
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Reviewer streams idle for long stretches; keepalive pings find dead peers.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        pb_grpc.add_ReviewServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection([REVIEW_SERVICE, health.SERVICE_NAME], self.server)
        self.port = 0
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self, *, port: int | None = None) -> int:
        address = f"{self.settings.host}:{self.settings.port if port is None else port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind the review service to {address}")
        self.servicer.attach(asyncio.get_running_loop())
        await self.server.start()
        for name in ("", REVIEW_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._housekeeping = asyncio.create_task(self._housekeep())
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

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        self.servicer.detach()
        await self.server.stop(self.settings.grace_period_s)
        self.executor.shutdown(wait=True)
        self.store.close()
