"""The page's HTTP listener: uvicorn serving on the review service's own event loop, with its TLS settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from services.rpc.tls import check_plaintext_allowed
from services.settings import SecuritySettings

log = logging.getLogger("medgate.review.web")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the review service's process owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebListener:
    """``await start()`` binds (the socket is ours, so a port in use is an exception, not uvicorn's exit)."""

    def __init__(self, app: Any, *, host: str, port: int, security: SecuritySettings) -> None:
        self.host, self.port, self.security = host, port, security
        if not security.tls:
            check_plaintext_allowed(host, security)
        options: dict[str, Any] = {}
        if security.tls:
            options = {"ssl_certfile": str(security.cert_file), "ssl_keyfile": str(security.key_file)}
            if security.require_client_cert:
                options |= {"ssl_ca_certs": str(security.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=2,
            **options,
        )
        self._server = _EmbeddedServer(self.config)
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.security.tls else "http"

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host.strip("[]"), self.port), family=family, backlog=128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="medgate-review-web")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the reviewer page's listener stopped while starting")
            await asyncio.sleep(0.01)
        log.info("reviewer page on %s://%s:%d/", self.scheme, self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
