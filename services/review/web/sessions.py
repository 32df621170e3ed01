"""Signed-in browser sessions: a random id in an HttpOnly cookie, the bearer token kept on the server.

Pure (no HTTP): the token never reaches the page's JavaScript, and a session that sees no request for
``idle_timeout_s`` is gone (automatic logoff), as is one older than ``max_age_s`` however active. Every
request still verifies the token again, so an expired or withdrawn token ends the session however active
it is. A session signed in through the identity provider (services/review/web/oidc.py) also keeps its
refresh token and ID token: the first to renew the access token, the second to end the IdP's session at
sign-out.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.security.identity import Identity


@dataclass
class Session:
    session_id: str
    token: str
    identity: Identity
    last_seen: float
    started: float = 0.0
    # Sent back in a header on every state-changing request (double-submit), besides SameSite=Strict.
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # OIDC sign-in only: the IdP's refresh token (empty: none; the session ends with its access token),
    # the ID token (the hint for the IdP's end-session endpoint) and the access token's expiry (epoch s).
    refresh_token: str = field(default="", repr=False)
    id_token: str = field(default="", repr=False)
    token_expires_at: float = 0.0
    # One refresh at a time per session: the page's parallel requests must not spend a rotating refresh token twice.
    refreshing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


class Sessions:
    """In memory, per review process: a replica that restarts (or another replica) asks to sign in again."""

    def __init__(
        self,
        *,
        idle_timeout_s: float,
        max_age_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(
        self,
        token: str,
        identity: Identity,
        *,
        refresh_token: str = "",
        id_token: str = "",
        token_expires_at: float = 0.0,
    ) -> Session:
        """A new session with a new id (never one the browser brought: no session fixation)."""
        self._sweep()
        now = self._clock()
        session = Session(
            secrets.token_urlsafe(32),
            token,
            identity,
            now,
            started=now,
            refresh_token=refresh_token,
            id_token=id_token,
            token_expires_at=token_expires_at,
        )
        self._sessions[session.session_id] = session
        return session

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen > self.idle_timeout_s or now - session.started > self.max_age_s

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The live session of ``session_id``; ``touch``: this request counts as the reviewer's activity."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        if touch:
            session.last_seen = now
        return session

    def idle_left_s(self, session: Session) -> float:
        return max(0.0, self.idle_timeout_s - (self._clock() - session.last_seen))

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]
