"""What the interceptors know about the call in progress, shared with the servicer through a context variable.

gRPC's asyncio server runs each call in its own task, so a ``ContextVar`` set by the outermost
interceptor is this call's alone (and is copied into the tasks the servicer starts).
"""

from __future__ import annotations

import contextvars
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.security.identity import Identity

# A caller's own id (a PACS accession workflow id, a load-test id) is echoed back and logged;
# anything else gets a fresh one. Both travel as trailing metadata of every answer.
REQUEST_ID_KEY = "x-request-id"
# The HTTP face (services/http) calls this process's gRPC server over its private Unix socket and says here
# which network address its own caller came from; honoured only on that socket, never from the network.
FORWARDED_PEER_KEY = "x-medgate-http-peer"
_PEER = re.compile(r"^(ipv4|ipv6):[0-9A-Fa-f.:\[\]%]{1,60}$")


@dataclass
class Call:
    """One RPC as the interceptors see it: who asked for what, until when, and how it ended."""

    service: str  # e.g. "medgate.v1.Inference"
    method: str  # e.g. "Classify"
    started: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    # time.monotonic() by which the caller wants its answer (None: the caller set no deadline).
    caller_deadline: float | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""  # the caller-safe error message, when the call failed
    response: Any = None  # a unary answer, for the access log's stage timings
    identity: Identity | None = None  # the verified caller (None with security.auth off)
    peer: str = ""  # the transport address gRPC reports

    @property
    def trailer(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.request_id),) if self.request_id else ()

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("medgate_rpc_call", default=None)


def split_method(full_method: str) -> tuple[str, str]:
    """``/medgate.v1.Inference/Classify`` -> (``medgate.v1.Inference``, ``Classify``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def begin(full_method: str) -> Call:
    """Start this task's call record (the outermost interceptor does this once per call)."""
    service, method = split_method(full_method)
    call = Call(service=service, method=method)
    _CURRENT.set(call)
    return call


def current_call() -> Call | None:
    """The call this task serves, or None outside an RPC (a unit test calling a servicer directly)."""
    return _CURRENT.get()


def request_deadline(default_s: float) -> float:
    """``time.monotonic()`` by which one request (a unary call or one stream item) must be answered.

    ``default_s`` from now, or the caller's own deadline when that comes first.
    """
    deadline = time.monotonic() + default_s
    call = _CURRENT.get()
    if call is not None and call.caller_deadline is not None:
        deadline = min(deadline, call.caller_deadline)
    return deadline


def transport_peer(context: grpc.aio.ServicerContext) -> str:
    """The caller's network address: gRPC's, or for a call the HTTP face forwarded, that face's client."""
    peer = context.peer() or ""
    if peer.startswith("unix:"):
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_PEER_KEY and isinstance(value, str) and _PEER.match(value):
                return value
    return peer
