"""The reviewer page's ASGI app: sign-in, a live queue over Server-Sent Events, and the review actions.

Every action goes through the review servicer's own logic with the caller's verified identity on the
call record (:func:`services.rpc.call.begin`), so :func:`~services.review.servicer.reviewer_of`, the
store calls, leases and decisions are those of the gRPC API: StreamCases pushes cases (one in flight
per page), RenewLease and ReleaseCase are called as they are, and a submission goes through
SubmitReview's own code (:func:`services.review.decide.submit_decision`), adding what A2I records
beside the answer (``initialValueModified``, the per-mask decisions: :mod:`.cases`). Roles come from
:mod:`services.security.policy` for the RPC each action stands for; every action is an audit event as
its RPC would be, written before the answer leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from medgate.v1 import review_pb2 as pb
from services.audit import (
    Action,
    AuditEvent,
    AuditLog,
    EventID,
    EventType,
    ParticipantRole,
    SecurityResource,
    requestor,
)
from services.audit.events import ParticipantObject
from services.review.convert import MODALITY_NAME
from services.review.decide import submit_decision
from services.review.servicer import Reviewer, ReviewServicer, reviewer_of
from services.review.store import Loop, NotFound
from services.rpc.call import Call, begin
from services.rpc.interceptors.audit import RPC_EVENTS, WITHHELD
from services.rpc.status import status_for
from services.security.credentials import token_file
from services.security.errors import Unauthenticated
from services.security.identity import Identity, Role
from services.security.policy import roles_for
from services.security.tokens import TokenVerifier
from services.settings import ReviewSettings, SecuritySettings

from .cases import case_json, decision_id, page_answer, parse_answer
from .oidc import OidcSignIn
from .sessions import Session, Sessions

log = logging.getLogger("medgate.review.web")

STATIC = Path(__file__).resolve().parent / "static"
_R = "/medgate.v1.Review/"
STREAM, SUBMIT, RELEASE, RENEW = (f"{_R}{m}" for m in ("StreamCases", "SubmitReview", "ReleaseCase", "RenewLease"))
# Sign-in and sign-out have no RPC; their audit events name these.
SIGN_IN, SIGN_OUT = "/medgate.web.ReviewPage/SignIn", "/medgate.web.ReviewPage/SignOut"
PAGE_ROLES = frozenset({Role.REVIEWER, Role.ADMIN})
# A custom header cross-site pages cannot send without a CORS preflight we never answer (CSRF defence,
# besides SameSite=Strict and the session's own token).
CSRF_HEADER = "x-medgate-csrf"
# Server-Sent Events: a comment line this often keeps proxies from closing an idle stream, and the
# session (idle time-out, token expiry) is checked as often.
KEEPALIVE_S = 5.0
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _StreamContext:
    """What StreamCases needs of a gRPC context: headers go out with the SSE response instead."""

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None


class ReviewPage:
    """The page and its JSON/SSE API over one review servicer; ``app`` is the Starlette application."""

    def __init__(
        self,
        servicer: ReviewServicer,
        security: SecuritySettings,
        audit: AuditLog | None,
        *,
        idle_timeout_s: float,
        secure_cookie: bool,
        verifier: TokenVerifier | None = None,
        settings: ReviewSettings | None = None,
    ) -> None:
        self.servicer = servicer
        self.security = security
        self.audit = audit
        self.verifier = verifier or TokenVerifier(security)
        web = settings or ReviewSettings()
        self.sessions = Sessions(idle_timeout_s=idle_timeout_s, max_age_s=web.web_session_max_s)
        self.secure_cookie = secure_cookie
        self.cookie = "__Host-medgate-review" if secure_cookie else "medgate-review"
        self.closing = asyncio.Event()
        self.sign_in = OidcSignIn(self, web)  # the IdP's sign-in (/auth/login, /auth/callback) when configured
        self.app = Starlette(
            routes=[
                *self.sign_in.routes,
                Route("/", self.index),
                Route("/api/session", self.session, methods=["GET"]),
                Route("/api/session/token", self.sign_in_token, methods=["POST"]),
                Route("/api/session/dev", self.sign_in_dev, methods=["POST"]),
                Route("/api/session/signout", self.sign_out, methods=["POST"]),
                Route("/api/events", self.events),
                Route("/api/cases/{delivery_id}/renew", self.renew, methods=["POST"]),
                Route("/api/cases/{delivery_id}/release", self.release, methods=["POST"]),
                Route("/api/cases/{delivery_id}/submit", self.submit, methods=["POST"]),
                Route("/api/cases/{delivery_id}/modality.png", self.modality_png, methods=["GET"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ],
            exception_handlers={HttpError: self._http_error},  # type: ignore[dict-item]
        )
        self.app.add_middleware(_SecurityHeaders)

    # --- plumbing --------------------------------------------------------------------------------

    @property
    def dev_token_path(self) -> Path | None:
        """The development reviewer's token, when the embedded default's signing key is the one in use."""
        sec = self.security
        if sec.oidc_issuer or Path(sec.jwks_file).resolve().parent != Path(sec.credentials_dir).resolve():
            return None
        path = Path(sec.credentials_dir) / token_file(Role.REVIEWER)
        return path if path.is_file() else None

    async def _http_error(self, request: Request, exc: HttpError) -> Response:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @staticmethod
    def _peer(request: Request) -> str:
        client = request.client
        return f"ipv4:{client.host}:{client.port}" if client is not None else ""

    def _begin(self, rpc: str, identity: Identity, request: Request) -> Call:
        """This task's call record, as the gRPC interceptors would have made it: the servicer reads it."""
        call = begin(rpc)
        call.identity, call.peer = identity, self._peer(request)
        call.request_id = request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        if not call.request_id.replace("-", "").isalnum():
            call.request_id = uuid.uuid4().hex
        return call

    async def _audit(
        self,
        rpc: str,
        status: str,
        request: Request,
        identity: Identity | None,
        objects: tuple[ParticipantObject, ...] = (),
        *,
        request_id: str = "",
    ) -> None:
        """One event as the audit interceptor would write it for ``rpc``; raises when it cannot be written."""
        if self.audit is None:
            return
        spec = RPC_EVENTS.get(rpc)
        event_id, action = (spec.event_id, spec.action) if spec else (EventID.USER_AUTHENTICATION, Action.EXECUTE)
        types: tuple[EventType, ...] = (EventType.LOGIN,) if rpc == SIGN_IN else ()
        if status == "UNAUTHENTICATED":
            event_id, action, types, objects = EventID.USER_AUTHENTICATION, Action.EXECUTE, (EventType.LOGIN,), ()
            objects = (SecurityResource(rpc),)
        elif status == "PERMISSION_DENIED":
            event_id, action, types = EventID.SECURITY_ALERT, Action.EXECUTE, (EventType.USE_OF_RESTRICTED_FUNCTION,)
            objects = (SecurityResource(rpc), *objects)
        peer = self._peer(request)
        who = (
            requestor(
                user_id=identity.subject, issuer=identity.issuer, name=identity.name, roles=identity.roles, peer=peer
            )
            if identity is not None
            else requestor(peer=peer)
        )
        app = self.audit.application.participant(ParticipantRole.APPLICATION)
        event = AuditEvent(
            event_id=event_id,
            action=action,
            status=status,
            event_types=types,
            participants=(who, app),
            objects=objects,
            rpc=rpc,
            request_id=request_id,
        )
        await self.audit.record(event)

    async def _audit_or_withhold(self, *args: Any, **kwargs: Any) -> None:
        """Fail closed: an action whose audit event cannot be written gets no answer (as over gRPC)."""
        try:
            await self._audit(*args, **kwargs)
        except Exception:
            raise HttpError(503, "UNAVAILABLE", WITHHELD) from None

    async def _refuse(self, request: Request, rpc: str, status: str, message: str, identity: Identity | None) -> None:
        with contextlib.suppress(Exception):  # the writer logs a failure as CRITICAL; the refusal stands
            await self._audit(rpc, status, request, identity)
        raise HttpError(401 if status == "UNAUTHENTICATED" else 403, status, message)

    def _check_csrf(self, request: Request, session: Session | None) -> None:
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent or (session is not None and not secrets.compare_digest(sent, session.csrf)):
            raise HttpError(403, "PERMISSION_DENIED", "missing or wrong CSRF token (reload the page)")

    async def _authorized(self, request: Request, rpc: str, *, touch: bool = True) -> tuple[Session, Identity]:
        """The signed-in reviewer, verified again now, with a role that may call ``rpc``."""
        session = self.sessions.get(request.cookies.get(self.cookie), touch=touch)
        if session is None:
            await self._refuse(request, rpc, "UNAUTHENTICATED", "not signed in, or signed out after being idle", None)
            raise AssertionError("unreachable")
        if request.method == "POST":
            self._check_csrf(request, session)
        await self.sign_in.refresh_if_due(session)
        try:
            identity = await self.verifier.verify_async(session.token, peer=self._peer(request))
        except Unauthenticated as exc:
            self.sessions.drop(session.session_id)
            await self._refuse(request, rpc, "UNAUTHENTICATED", f"the token is no longer valid ({exc})", None)
            raise AssertionError("unreachable") from None
        if not identity.has_any(roles_for(rpc)):
            await self._refuse(request, rpc, "PERMISSION_DENIED", "this user may not review cases", identity)
        return session, identity

    def _session_json(self, session: Session | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "signedIn": session is not None,
            "devSignIn": self.dev_token_path is not None,
            "oidcSignIn": self.sign_in.enabled,
            "tokenSignIn": not self.sign_in.enabled,  # with an IdP's sign-in configured, only that
            "idleTimeoutS": self.sessions.idle_timeout_s,
        }
        if session is not None:
            who = session.identity
            body |= {"subject": who.subject, "name": who.name or who.subject, "roles": sorted(who.roles)}
            body["csrf"] = session.csrf
        return body

    def _error(self, exc: BaseException) -> HttpError:
        code, message = status_for(exc)
        return HttpError(_HTTP.get(code, 500), code.name, message)

    # --- pages and sessions ----------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def session(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(self.cookie), touch=False)
        return JSONResponse(self._session_json(session))

    async def _sign_in(self, request: Request, token: str) -> Response:
        self._check_csrf(request, None)
        try:
            identity = await self.verifier.verify_async(token.strip(), peer=self._peer(request))
        except Unauthenticated as exc:
            await self._refuse(request, SIGN_IN, "UNAUTHENTICATED", f"the token was not accepted ({exc})", None)
            raise AssertionError("unreachable") from None
        if not identity.has_any(PAGE_ROLES):
            await self._refuse(request, SIGN_IN, "PERMISSION_DENIED", "this user has no reviewer role", identity)
        await self._audit_or_withhold(SIGN_IN, "OK", request, identity)
        session = self.sessions.create(token.strip(), identity)
        response = JSONResponse(self._session_json(session))
        response.set_cookie(
            self.cookie, session.session_id, httponly=True, secure=self.secure_cookie, samesite="strict", path="/"
        )
        log.info("reviewer signed in on the web page")
        return response

    async def sign_in_token(self, request: Request) -> Response:
        if self.sign_in.enabled:
            raise HttpError(404, "NOT_FOUND", "sign in through the identity provider (/auth/login)")
        try:
            body = await request.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip() or len(token) > 16384:
            raise HttpError(400, "INVALID_ARGUMENT", 'send {"token": "<JWT>"}')
        return await self._sign_in(request, token)

    async def sign_in_dev(self, request: Request) -> Response:
        path = self.dev_token_path
        if path is None:
            raise HttpError(404, "NOT_FOUND", "no development credentials are in use here; sign in with a token")
        token = await asyncio.get_running_loop().run_in_executor(None, path.read_text)
        return await self._sign_in(request, token)

    async def sign_out(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(self.cookie), touch=False)
        end_session = ""
        if session is not None:
            self._check_csrf(request, session)
            self.sessions.drop(session.session_id)
            with contextlib.suppress(Exception):
                await self._audit(SIGN_OUT, "OK", request, session.identity)
            end_session = await self.sign_in.end_session_url(session, request)  # the page then ends the IdP's too
        response = JSONResponse(self._session_json(None) | {"endSessionUrl": end_session})
        response.delete_cookie(self.cookie, path="/", secure=self.secure_cookie, httponly=True, samesite="strict")
        return response

    # --- the live queue --------------------------------------------------------------------------

    async def _queue(self) -> list[dict[str, Any]]:
        store = self.servicer.store
        flows = list(self.servicer.flows.values())
        depths = await self.servicer._run(lambda: [store.queue_depth(f.name) for f in flows])
        return [
            {"name": f.name, "taskType": f.task_type.value, "pending": d} for f, d in zip(flows, depths, strict=True)
        ]

    async def events(self, request: Request) -> Response:
        session, identity = await self._authorized(request, STREAM, touch=False)
        return StreamingResponse(
            self._event_stream(request, session, identity),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    async def _event_stream(self, request: Request, session: Session, identity: Identity) -> AsyncIterator[str]:
        call = self._begin(STREAM, identity, request)
        out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        poke = asyncio.Event()
        unsubscribe = self.servicer.store.listen(lambda event: loop.call_soon_threadsafe(poke.set))

        async def cases() -> None:
            stream = self.servicer.StreamCases(pb.StreamCasesRequest(max_in_flight=1), _StreamContext())
            try:
                async for case in stream:
                    item = RPC_EVENTS[STREAM].item
                    objects = item(case) if item is not None else None
                    await self._audit(
                        STREAM, "OK", request, identity, objects[0] if objects else (), request_id=call.request_id
                    )
                    body = await loop.run_in_executor(self.servicer.executor, case_json, case)
                    await out.put(("case", body))
                    poke.set()
            except Exception as exc:
                await out.put(("failed", {"error": status_for(exc)[0].name, "message": status_for(exc)[1]}))
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        async def counts() -> None:
            last: Any = None
            while True:
                queue = await self._queue()
                if queue != last:
                    await out.put(("queue", {"flows": queue}))
                    last = queue
                poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poke.wait(), KEEPALIVE_S)

        tasks = [asyncio.create_task(cases()), asyncio.create_task(counts())]
        try:
            yield ": medgate reviewer stream\nretry: 1000\n\n"
            while not self.closing.is_set():
                try:
                    name, body = await asyncio.wait_for(out.get(), KEEPALIVE_S)
                except TimeoutError:
                    if self.sessions.get(session.session_id, touch=False) is None:
                        yield "event: signedout\ndata: {}\n\n"
                        return
                    yield ": keepalive\n\n"
                    continue
                yield f"event: {name}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"
                if name == "failed":
                    return
        finally:
            unsubscribe()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    # --- actions ---------------------------------------------------------------------------------

    async def _act(self, request: Request, rpc: str, work: Callable[[Call], Any]) -> Any:
        """Run one action as ``rpc`` with the caller's identity; audit it; map errors as the RPC layer would."""
        _, identity = await self._authorized(request, rpc)
        call = self._begin(rpc, identity, request)
        try:
            result = await work(call)
        except HttpError:
            raise
        except Exception as exc:
            error = self._error(exc)
            with contextlib.suppress(Exception):
                await self._audit(rpc, error.code, request, identity, request_id=call.request_id)
            raise error from None
        return identity, call, result

    async def renew(self, request: Request) -> Response:
        delivery = request.path_params["delivery_id"]

        async def work(call: Call) -> pb.RenewLeaseResponse:
            return await self.servicer.RenewLease(pb.RenewLeaseRequest(delivery_id=delivery), None)

        identity, call, answer = await self._act(request, RENEW, work)
        await self._audit_or_withhold(RENEW, "OK", request, identity, request_id=call.request_id)
        return JSONResponse({"leaseExpiresMs": answer.lease_expires.ToMilliseconds()})

    async def release(self, request: Request) -> Response:
        delivery = request.path_params["delivery_id"]

        async def work(call: Call) -> None:
            await self.servicer.ReleaseCase(pb.ReleaseCaseRequest(delivery_id=delivery), None)

        identity, call, _ = await self._act(request, RELEASE, work)
        await self._audit_or_withhold(RELEASE, "OK", request, identity, request_id=call.request_id)
        return JSONResponse({"released": delivery})

    async def submit(self, request: Request) -> Response:
        delivery = request.path_params["delivery_id"]
        try:
            body = await request.json()
        except ValueError:
            body = None

        async def work(call: Call) -> tuple[Loop, bool]:
            kind, value = parse_answer(body)
            reviewer = reviewer_of("")
            comment = body.get("comment", "") if isinstance(body, dict) else ""
            comment = comment[:2000] if isinstance(comment, str) else ""
            return await self.servicer._run(lambda: self._submit(reviewer, delivery, kind, value, comment))

        identity, call, (loop, recorded_now) = await self._act(request, SUBMIT, work)
        response = pb.SubmitReviewResponse(human_loop=pb.HumanLoop(name=loop.name, flow_definition=loop.flow))
        objects = RPC_EVENTS[SUBMIT].objects(None, response)
        await self._audit_or_withhold(SUBMIT, "OK", request, identity, objects, request_id=call.request_id)
        return JSONResponse({"humanLoopName": loop.name, "status": loop.status.value, "recordedNow": recorded_now})

    def _submit(self, reviewer: Reviewer, delivery_id: str, kind: str, value: Any, comment: str) -> tuple[Loop, bool]:
        """SubmitReview's own store calls (on a store thread), the answer made from the case."""
        store = self.servicer.store
        return submit_decision(
            store,
            self.servicer.flows,
            reviewer,
            delivery_id=delivery_id,
            decision_id=decision_id(delivery_id),
            answer=lambda loop: page_answer(store, loop, kind, value, comment),
        )

    async def modality_png(self, request: Request) -> Response:
        """A leased case's 16-bit modality image (a PNG the page decodes itself: canvases read 8 bits only).

        Only the reviewer holding the lease gets it; the case's delivery was audited when it was streamed.
        """
        delivery = request.path_params["delivery_id"]

        async def work(call: Call) -> bytes:
            reviewer = reviewer_of("").key
            store = self.servicer.store

            def read() -> bytes:
                if not any(d.delivery_id == delivery for d in store.open_deliveries(reviewer)):
                    raise NotFound("no open lease of yours has this delivery id")
                data = store.images(store.loop_of_delivery(delivery).name).get(MODALITY_NAME)
                if data is None:
                    raise NotFound("this case has no 16-bit image (its input was not grey DICOM)")
                return data

            return await self.servicer._run(read)

        _, _, data = await self._act(request, STREAM, work)
        return Response(data, media_type="image/png", headers={"cache-control": "private, no-store"})


class _SecurityHeaders:
    """CSP (no inline script), nosniff, no referrer and no caching on every answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


__all__ = ["ReviewPage", "case_json", "decision_id"]
