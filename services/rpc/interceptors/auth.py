"""Authentication and roles for every RPC: ``authorization: Bearer <JWT>``, checked against the policy table.

Health checks stay open (probes carry no tokens); reflection is open unless
``security.reflection_requires_token``. Every other method needs a verified token whose roles
include one that :mod:`services.security.policy` lists for it; a method missing from that table is
refused to everyone, so a new RPC cannot ship open. The verified :class:`Identity` (with the client
certificate's subject under mutual TLS) goes on the call record for the servicers and the audit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.rpc.call import current_call, split_method, transport_peer
from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate
from services.security.errors import PermissionDenied, Unauthenticated
from services.security.identity import Identity
from services.security.policy import OPEN_SERVICES, REFLECTION_SERVICES, roles_for
from services.security.tokens import TokenVerifier

log = logging.getLogger("medgate.security")

_BEARER = "bearer "


def _token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    raise Unauthenticated("no bearer token")


def _node(context: grpc.aio.ServicerContext) -> str:
    """The client certificate's subject under mutual TLS (gRPC gives its common name), else ""."""
    auth = context.auth_context() or {}
    names = auth.get("x509_subject") or auth.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace")[:256] if names else ""


class AuthInterceptor(RpcInterceptor):
    def __init__(self, verifier: TokenVerifier, *, reflection_requires_token: bool, mutual_tls: bool = False) -> None:
        super().__init__()
        self.verifier = verifier
        self.reflection_requires_token = reflection_requires_token
        self.mutual_tls = mutual_tls  # only then is there a client certificate to read (auth_context costs)

    def skip(self, full_method: str) -> bool:
        service, _ = split_method(full_method)
        return service in OPEN_SERVICES or (service in REFLECTION_SERVICES and not self.reflection_requires_token)

    async def _admit(self, full_method: str, context: grpc.aio.ServicerContext) -> Identity:
        call = current_call()
        peer = call.peer if call is not None and call.peer else transport_peer(context)
        try:
            node = _node(context) if self.mutual_tls else ""
            identity = await self.verifier.verify_async(_token(context), peer=peer, node=node)
        except Unauthenticated as exc:
            log.warning("refused %s from %s: %s", full_method, peer, exc.reason)
            raise
        if call is not None:
            call.identity = identity
        if not identity.has_any(roles_for(full_method)):
            log.warning("refused %s to %s: roles %s", full_method, identity.principal, ",".join(sorted(identity.roles)))
            raise PermissionDenied()
        return identity

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        await self._admit(full_method, context)
        return await behavior(request, context)

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await self._admit(full_method, context)
        async for item in iterate(behavior, request, context):
            yield item
