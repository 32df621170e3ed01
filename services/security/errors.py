"""Authentication and authorization failures. Their messages say only which of the two it was.

A caller probing the service learns "no valid token" or "not allowed", never which check failed
(signature, issuer, audience, expiry) or which role would have worked; the log says more.
"""

from __future__ import annotations


class Unauthenticated(Exception):
    """No token, or one that does not verify (maps to UNAUTHENTICATED)."""

    def __init__(self, reason: str) -> None:
        super().__init__("a valid bearer token is required (authorization: Bearer <JWT>)")
        self.reason = reason  # for the server's log only


class PermissionDenied(PermissionError):
    """A verified caller whose roles do not allow this call (maps to PERMISSION_DENIED)."""

    def __init__(self, message: str = "the caller's roles do not allow this call") -> None:
        super().__init__(message)
