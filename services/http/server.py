"""The HTTP face's lifecycle in a gateway worker: its private way into the worker's gRPC server, and its listener.

The way in is a Unix socket in a fresh 0700 folder (one per worker), added to the worker's gRPC server
before it starts: the face's calls meet the whole interceptor chain, stay in this worker (no second
hop through the kernel's SO_REUSEPORT spread), and pay no TLS on a loopback hop. Only this process's
user (who can read the server key anyway) can connect to it, so skipping TLS there weakens nothing;
tokens are still checked on every call.

The listener is uvicorn on the worker's event loop with the gRPC listener's TLS settings: the same
certificate and key, re-read when they change on disk (checked at most once a second, on new
connections), mutual TLS when ``security.require_client_cert`` is on, and plaintext only on loopback
unless ``security.allow_plaintext_on_network``. Several workers share the port with SO_REUSEPORT, as
their gRPC listeners do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn

from services.http.app import HttpFace
from services.rpc.tls import check_plaintext_allowed
from services.settings import SecuritySettings, Settings

log = logging.getLogger("medgate.gateway")

_RELOAD_CHECK_S = 1.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway worker owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ReloadingTls:
    """A server SSLContext whose certificate (and client CA) is re-read when the files change.

    Python's SSLContext cannot be refilled safely while connections use it, so a changed file gives a
    fresh context, and each new connection is moved onto the newest one in the SNI callback (which
    OpenSSL runs for every ClientHello, with or without a server name).
    """

    def __init__(self, security: SecuritySettings) -> None:
        self.cert_file = Path(security.cert_file)
        self.key_file = Path(security.key_file)
        self.client_ca_file = Path(security.client_ca_file) if security.require_client_cert else None
        self._checked = 0.0
        try:
            self._stamp = self._current_stamp()
            self.current = self._build()
        except (OSError, ssl.SSLError) as exc:
            raise RuntimeError(
                f"TLS is on but the HTTP face cannot load {getattr(exc, 'filename', None) or self.cert_file}; "
                "run `medgate credentials` for the development files or set security.cert_file and security.key_file"
            ) from None
        self.context = self.current  # what the listener is given; connections may move to a newer one
        self.context.sni_callback = self._on_hello

    def _files(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _current_stamp(self) -> tuple[int, ...]:
        return tuple(path.stat().st_mtime_ns for path in self._files())

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.client_ca_file))
        context.set_alpn_protocols(["http/1.1"])
        return context

    def refresh(self) -> None:
        """A new context when a file changed since the last look; the old one stays on any failure."""
        now = time.monotonic()
        if now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return
            fresh = self._build()
        except (OSError, ssl.SSLError):
            log.error("HTTP face: TLS files could not be re-read; the previous certificate stays in use", exc_info=True)
            return
        self._stamp, self.current = stamp, fresh
        log.info("HTTP face: TLS certificate re-read from %s", self.cert_file)

    def _on_hello(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        self.refresh()
        if self.current is not context:
            connection.context = self.current


class HttpServer:
    """``bind_loopback(grpc_server)`` before that server starts, then ``await start()``; ``await stop()`` drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        gateway = settings.gateway
        self.host = gateway.http_host or gateway.host
        self.port = gateway.http_port
        self.security = settings.security
        self._folder: Path | None = None
        self.loopback = ""
        self.tls: ReloadingTls | None = None
        self._channel: grpc.aio.Channel | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.security.tls else "http"

    def bind_loopback(self, server: grpc.aio.Server) -> None:
        """Give the face its own way into ``server`` (call before the server starts)."""
        self._folder = Path(tempfile.mkdtemp(prefix="medgate-http-"))  # 0700: this user only
        self.loopback = f"unix:{self._folder / 'grpc.sock'}"
        if server.add_insecure_port(self.loopback) == 0:
            raise RuntimeError(f"could not bind the HTTP face's socket {self.loopback}")

    def _socket(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.settings.gateway.workers > 1:  # the workers share the port; one alone owns it (a clash is an error)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host.strip("[]"), port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"the HTTP face cannot listen on {self.host}:{port}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock

    async def start(self, *, any_port: bool = False) -> int:
        """Listen (on a free port when ``any_port``) and serve; returns the bound port."""
        if not self.loopback:
            raise RuntimeError("HttpServer.bind_loopback must be called before the gRPC server starts")
        try:
            return await self._start(any_port)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, any_port: bool) -> int:
        if self.security.tls:
            self.tls = ReloadingTls(self.security)
        else:
            check_plaintext_allowed(self.host, self.security)
        gateway = self.settings.gateway
        self._channel = grpc.aio.insecure_channel(
            self.loopback,
            options=[
                ("grpc.max_send_message_length", -1),  # the server's own limit judges, as for any caller
                ("grpc.max_receive_message_length", gateway.max_send_message_bytes),
            ],
        )
        config = uvicorn.Config(
            HttpFace(self.settings, self._channel),
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,  # the gRPC access log has one line per call, HTTP callers' included
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, round(gateway.grace_period_s)),
        )
        config.load()
        if self.tls is not None:
            config.ssl = self.tls.context
        sock = self._socket(0 if any_port else self.port)
        self.port = sock.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="medgate-http-face")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP face stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP face (POST /score, /v1/*) on %s://%s:%d", self.scheme, self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (gateway.grace_period_s), then close the way in."""
        if self._task is not None and self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
