"""The reviewer page's ASGI app: sign-in, a live queue over Server-Sent Events, and the review actions.

Every action goes through the review servicer's own logic with the caller's verified identity on the
call record (:func:`services.rpc.call.begin`), so :func:`~services.review.servicer.reviewer_of`, the
store calls, leases and decisions are those of the gRPC API: StreamCases pushes cases (one in flight
per page), RenewLease and ReleaseCase are called as they are, and a submission makes the same store
calls as SubmitReview, adding what A2I records beside the answer (``initialValueModified``, the
per-mask decisions). Roles come from :mod:`services.security.policy` for the RPC each action stands
for; every action is an audit event as its RPC would be, written before the answer leaves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from medgate.v1 import inference_pb2 as ipb
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
from services.review.convert import MASKS_NAME, answer_content
from services.review.flows import InvalidArgument, validate_answer
from services.review.output import write_output
from services.review.servicer import Reviewer, ReviewServicer, reviewer_of
from services.review.store import Loop, LoopStatus, NotFound
from services.rpc.call import Call, begin
from services.rpc.interceptors.audit import RPC_EVENTS, WITHHELD
from services.rpc.status import status_for
from services.security.credentials import token_file
from services.security.errors import Unauthenticated
from services.security.identity import Identity, Role
from services.security.policy import roles_for
from services.security.tokens import TokenVerifier
from services.settings import ReviewSettings, SecuritySettings

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
# A moved box corner under this many model pixels is rounding, not a correction.
BOX_TOLERANCE_PX = 0.5
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


def task_name(task_type: int) -> str:
    return pb.TaskType.Name(task_type).removeprefix("TASK_TYPE_").lower()


def _png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _mask_pngs(masks: ipb.NDArray) -> list[str]:
    """Each mask of a case as a 1-bit-looking PNG (0/255), for the page to tint and draw."""
    if not masks.data or len(masks.shape) != 3:
        return []
    count, height, width = (int(v) for v in masks.shape)
    bits = np.unpackbits(np.frombuffer(masks.data, np.uint8))[: count * height * width]
    stack = bits.reshape(count, height, width) * np.uint8(255)
    return [_png_data_url(cv2.imencode(".png", m)[1].tobytes()) for m in stack]


def _box(d: ipb.Detection) -> list[float]:
    b = d.model_box if d.HasField("model_box") else d.box
    return [b.x0, b.y0, b.x1, b.y1]


def case_json(case: pb.ReviewCase) -> dict[str, Any]:
    """A case as the page draws it; every coordinate is in the 1024x1024 image the model saw."""

    return {
        "deliveryId": case.delivery_id,
        "humanLoopName": case.human_loop_name,
        "flow": case.flow_definition,
        "taskType": task_name(case.task_type),
        "categories": list(case.categories),
        "leaseExpiresMs": case.lease_expires.ToMilliseconds(),
        "image": _png_data_url(case.image_png) if case.image_png else "",
        "originalWidth": case.original_width,
        "originalHeight": case.original_height,
        "scores": [{"label": s.label, "score": round(s.score, 4)} for s in case.scores],
        "detections": [
            {
                "label": d.label,
                "score": round(d.score, 4),
                "box": _box(d),
            }
            for d in case.detections
        ],
        "prompts": [{"prompt": p.prompt, "category": p.category, "score": round(p.score, 4)} for p in case.prompts],
        "masks": _mask_pngs(case.masks),
    }


def decision_id(delivery_id: str) -> str:
    """One decision per delivery: a double click, a retry or a reload replays it instead of deciding twice."""
    return f"web:{delivery_id}"


def _model_boxes(loop: Loop) -> list[tuple[str, list[float]]]:
    boxes = []
    for det in loop.input_content.get("detection", {}).get("detections", []):
        mb = det.get("modelBox", det.get("model_box", {}))
        boxes.append((str(det.get("label", "")), [float(mb.get(k, 0.0)) for k in ("x0", "y0", "x1", "y1")]))
    return boxes


def _boxes_modified(loop: Loop, boxes: list[ipb.Detection]) -> bool:
    model = _model_boxes(loop)
    if len(model) != len(boxes):
        return True
    for (label, coords), det in zip(model, boxes, strict=True):
        mine = [det.model_box.x0, det.model_box.y0, det.model_box.x1, det.model_box.y1]
        if label != det.label or any(abs(a - b) > BOX_TOLERANCE_PX for a, b in zip(coords, mine, strict=True)):
            return True
    return False


def _number(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
        raise InvalidArgument(f"{what} must be a number")
    return float(value)


def _union_mask(store_images: dict[str, bytes], loop: Loop, accepted: list[bool]) -> ipb.NDArray:
    """The masks the reviewer accepted as one [1024, 1024] mask (A2I's segmentation answer is one labelled image)."""
    shape = [int(v) for v in loop.input_content.get("masksShape", [])]
    data = store_images.get(MASKS_NAME)
    if data is None or len(shape) != 3 or shape[0] != len(accepted):
        raise InvalidArgument(f"this case has {shape[0] if len(shape) == 3 else 0} masks, {len(accepted)} decided")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[: int(np.prod(shape))].reshape(shape)
    union = np.zeros(shape[1:], np.uint8)
    for keep, mask in zip(accepted, bits, strict=True):
        if keep:
            union |= mask
    return ipb.NDArray(
        data=np.packbits(union).tobytes(), shape=shape[1:], dtype="uint8", encoding=ipb.ARRAY_ENCODING_PACKBITS
    )


def parse_answer(body: Any) -> tuple[str, Any]:
    """(kind, value) of the page's answer: label, boxes, masks, accept or reject."""
    if not isinstance(body, dict) or not isinstance(body.get("answer"), dict):
        raise InvalidArgument("the body must be a JSON object with an answer object")
    answer = body["answer"]
    kind = answer.get("kind")
    if kind == "label" and isinstance(answer.get("label"), str):
        return kind, answer["label"]
    if kind == "reject" and isinstance(answer.get("reason"), str):
        return kind, answer["reason"][:1000] or "not reviewable"
    if kind == "accept":
        return kind, True
    if kind == "boxes" and isinstance(answer.get("boxes"), list) and len(answer["boxes"]) <= 1000:
        boxes = []
        for i, b in enumerate(answer["boxes"]):
            if not isinstance(b, dict) or not isinstance(b.get("label"), str):
                raise InvalidArgument(f"boxes[{i}] needs a label")
            x0, y0, x1, y1 = (_number(b.get(k), f"boxes[{i}].{k}") for k in ("x0", "y0", "x1", "y1"))
            box = ipb.Box(x0=min(x0, x1), y0=min(y0, y1), x1=max(x0, x1), y1=max(y0, y1))
            boxes.append(ipb.Detection(label=b["label"], model_box=box))
        return kind, boxes
    if kind == "masks" and isinstance(answer.get("accepted"), list):
        if not all(isinstance(v, bool) for v in answer["accepted"]):
            raise InvalidArgument("masks.accepted must be a list of true/false, one per mask")
        return kind, answer["accepted"]
    raise InvalidArgument("answer.kind must be label, boxes, masks, accept or reject, with its value")


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
        """SubmitReview's store calls (on a store thread), with A2I's ``initialValueModified`` in the answer."""
        store = self.servicer.store
        loop = store.loop_of_delivery(delivery_id)
        flow = self.servicer.flows.get(loop.flow)
        if flow is None:
            raise NotFound("flow definition not found (ListFlowDefinitions names them)")
        extra: dict[str, Any] = {}
        if kind == "label":
            answer = pb.ReviewAnswer(label=value)
            scores = loop.input_content.get("classification", {}).get("scores", [])
            extra["initialValueModified"] = not scores or scores[0].get("label") != value
        elif kind == "boxes":
            answer = pb.ReviewAnswer(boxes=pb.LabeledBoxes(boxes=value))
            extra["initialValueModified"] = _boxes_modified(loop, value)
        elif kind == "masks":
            prompts = loop.input_content.get("segmentation", {}).get("prompts", [])
            if all(value) and len(value) == len(prompts):
                answer = pb.ReviewAnswer(accept=True)
            else:
                answer = pb.ReviewAnswer(mask=_union_mask(store.images(loop.name), loop, value))
            extra["initialValueModified"] = not all(value)
            extra["maskDecisions"] = [
                {"prompt": str(p.get("prompt", "")), "category": str(p.get("category", "")), "accepted": keep}
                for p, keep in zip(prompts, value, strict=False)
            ]
        elif kind == "accept":
            answer = pb.ReviewAnswer(accept=True)
            extra["initialValueModified"] = False
        else:
            answer = pb.ReviewAnswer(reject_reason=value)
        if comment:
            answer.comment = comment
        content = answer_content(flow, loop, answer) | extra
        validate_answer(flow, content)
        decision = store.submit(
            decision_id(delivery_id),
            reviewer.key,
            content,
            delivery_id=delivery_id,
            issuer=reviewer.issuer,
            subject=reviewer.subject,
        )
        loop = store.describe(loop.name)
        if loop.status is LoopStatus.COMPLETED and not loop.output_path and flow.output_dir is not None:
            write_output(store, loop.name, flow.output_dir)
            loop = store.describe(loop.name)
        return loop, not decision.replayed


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
