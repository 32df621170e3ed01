"""Signed-in browser sessions: a random id in an HttpOnly cookie, the bearer token kept on the server.

Pure (no HTTP): the token never reaches the page's JavaScript, and a session that sees no request for
``idle_timeout_s`` is gone (automatic logoff). Every request still verifies the token again, so an
expired or withdrawn token ends the session however active it is.
"""

from __future__ import annotations

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
    # Sent back in a header on every state-changing request (double-submit), besides SameSite=Strict.
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))


class Sessions:
    """In memory, per review process: a replica that restarts (or another replica) asks to sign in again."""

    def __init__(self, *, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self, token: str, identity: Identity) -> Session:
        self._sweep()
        session = Session(secrets.token_urlsafe(32), token, identity, self._clock())
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The live session of ``session_id``; ``touch``: this request counts as the reviewer's activity."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self.idle_timeout_s:
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
        for key in [k for k, s in self._sessions.items() if now - s.last_seen > self.idle_timeout_s]:
            del self._sessions[key]
