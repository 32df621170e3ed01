"""One server lifecycle for every medgate gRPC service: interceptors, health, reflection, bind, graceful stop.

The gateway and the review service both build an :class:`RpcServer`, add their servicers, and get the
same interceptor chain, the ghz-capable reflection and the standard health service. TLS (a later
issue) plugs in at :meth:`RpcServer.start`, where the port is bound.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.audit import AuditLog
from services.rpc.interceptors.access_log import AccessLogInterceptor
from services.rpc.interceptors.audit import AuditInterceptor
from services.rpc.interceptors.auth import AuthInterceptor
from services.rpc.interceptors.deadline import DeadlineInterceptor
from services.rpc.interceptors.request_id import RequestIdInterceptor
from services.rpc.interceptors.status import StatusInterceptor
from services.rpc.interceptors.validation import ValidationInterceptor
from services.rpc.reflection import enable_reflection
from services.rpc.tls import check_plaintext_allowed, server_credentials
from services.security.tokens import TokenVerifier
from services.settings import SecuritySettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def default_interceptors(
    *,
    logger: str,
    default_deadline_s: float | None,
    security: SecuritySettings | None = None,
    audit: AuditLog | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The chain every call goes through, outermost first.

    The request id opens the call record; the access log sees the final code; the status boundary
    turns any exception into that code; authentication runs before anything reads the request; the
    deadline and validation run closest to the servicer, so their failures are mapped and logged
    like any other. The audit trail sits between the access log and the status boundary, so it
    records every call's final code (refusals included) and can withhold an answer it cannot record.
    """
    chain: list[grpc.aio.ServerInterceptor] = [
        RequestIdInterceptor(),
        AccessLogInterceptor(logger),
        *([AuditInterceptor(audit)] if audit is not None else []),
        StatusInterceptor(),
    ]
    if security is not None and security.auth:
        chain.append(
            AuthInterceptor(
                TokenVerifier(security),
                reflection_requires_token=security.reflection_requires_token,
                mutual_tls=security.tls and security.require_client_cert,
            )
        )
    chain += [DeadlineInterceptor(default_deadline_s), ValidationInterceptor()]
    return chain


# HTTP/2 settings for large messages: gRPC's own defaults (BDP probing on, which grows the flow-control windows
# to the connection's bandwidth-delay product; 16 KiB frames). Measured side by side for a 7.2 MB RG1_UNCI.dcm
# call over loopback (``python -m bench.bench_gateway --sections transport``; 2-core machine, 100 interleaved calls
# per arm): defaults p50 6.7 ms; 16 MiB frames 1.01x, an 8 MiB stream window 1.13x, BDP probing off with that
# window 1.04x, 4 MiB TCP reads 1.09x. None helped, so none is set here or on the clients' channels (only the
# message size limits, below and in clients/connect.py callers).


class RpcServer:
    """A grpc.aio server with medgate's interceptor chain, health checking and reflection."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        logger: str,
        default_deadline_s: float | None,
        grace_period_s: float,
        options: Sequence[tuple[str, Any]] = (),
        maximum_concurrent_rpcs: int | None = None,
        security: SecuritySettings | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        """``security`` None: plaintext and no tokens (loopback tools and benchmarks only)."""
        self.host = host
        self.security = security
        self.port = port
        self.grace_period_s = grace_period_s
        self.log = logging.getLogger(logger)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=default_interceptors(
                logger=logger, default_deadline_s=default_deadline_s, security=security, audit=audit
            ),
            options=list(options),
            maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services: list[str] = []

    def add(self, service_name: str, register: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> None:
        """Serve ``servicer`` (``register`` is the generated ``add_XServicer_to_server``)."""
        register(servicer, self.server)
        self.services.append(service_name)

    async def start(self, *, port: int | None = None) -> int:
        """Bind ``host:port`` (0 = a free port), start serving, and return the bound port."""
        enable_reflection([*self.services, health.SERVICE_NAME], self.server)
        address = f"{self.host}:{self.port if port is None else port}"
        if self.security is not None and self.security.tls:
            bound = self.server.add_secure_port(address, server_credentials(self.security))
        else:
            check_plaintext_allowed(self.host, self.security or SecuritySettings(tls=False))
            bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise RuntimeError(f"could not bind {', '.join(self.services)} to {address}")
        self.port = bound
        await self.server.start()
        return bound

    async def set_health(self, service: str, serving: bool) -> None:
        await self.health.set(service, SERVING if serving else NOT_SERVING)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def stop(self) -> None:
        """NOT_SERVING for every watcher first, then drain in-flight calls for ``grace_period_s``."""
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_period_s)
