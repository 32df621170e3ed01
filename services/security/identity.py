"""The caller of an RPC as established by its token (and, with mutual TLS, its client certificate)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """What a token's roles claim may grant. One RPC may accept several roles (admin does all of review)."""

    INFERENCE = "inference"  # Inference and Report RPCs: PACS routers, the CLI, load tests
    REVIEWER = "reviewer"  # receive, release and decide cases; describe a loop
    ADMIN = "admin"  # flows, start/stop/delete/list loops, manifest export
    ROUTER = "router"  # the gateway itself: start a human loop (and nothing else) on the review service


@dataclass(frozen=True)
class Identity:
    """A verified caller. ``subject`` and ``issuer`` come from the token; nothing here is patient data.

    ``node`` is the client certificate's subject (RFC 4514) under mutual TLS, else ``""``;
    ``peer`` the transport address gRPC reports (``ipv4:127.0.0.1:53412``).
    """

    subject: str
    issuer: str
    roles: frozenset[str]
    name: str = ""  # a display name (preferred_username) when the token has one
    node: str = ""
    peer: str = ""

    @property
    def principal(self) -> str:
        """One key per person across identity providers: ``sub`` is unique only within its issuer."""
        return f"{self.issuer}#{self.subject}"

    def has_any(self, roles: frozenset[str]) -> bool:
        return not self.roles.isdisjoint(roles)
