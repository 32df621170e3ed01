"""The HTTP/JSON face as an ASGI app: JSON in, the gateway's own gRPC call, JSON out. Translation only.

Every route is one (or, for ``/score``, one per item) call of ``medgate.v1.Inference`` over the
gateway worker's private loopback socket, so the caller's request meets the interceptor chain a gRPC
caller meets: request id, access log, audit, status table, auth and roles, deadline, validation,
limits, metrics. The caller's ``Authorization`` and ``X-Request-Id`` headers travel as that call's
metadata and ``X-Deadline-Ms`` as its deadline; its status comes back as an HTTP status
(:mod:`services.http.status`) and its request id as ``X-Request-Id``. What is checked here is only
what has no gRPC form: the body's size, that it is JSON, and that it maps onto the message (or onto
MedImageParse's schema). Those refusals are logged on the gateway's logger and counted in
``medgate_requests_total`` under ``rpc="http/<path>"``; they never reach a model or patient data.

Routes: ``POST /score`` (MedImageParse, :mod:`services.http.score`), ``POST /v1/classify``,
``/v1/detect``, ``/v1/segment``, ``/v1/analyze`` (protobuf's JSON mapping of the gRPC messages,
:mod:`services.http.protojson`), ``GET /openapi.json`` (:mod:`services.http.openapi`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from medgate.v1 import inference_pb2 as pb
from services.http import openapi, protojson, score
from services.http.routes import SEGMENT, V1_ROUTES, Rpc
from services.http.status import HttpError, bad_request, too_large
from services.metrics import REQUESTS
from services.rpc.call import REQUEST_ID_KEY
from services.rpc.errors import BadRequest, RequestTooLarge
from services.settings import Settings

log = logging.getLogger("medgate.gateway")

DEADLINE_HEADER = "x-deadline-ms"
FORWARDED_PEER_KEY = "x-medgate-http-peer"
# The gateway's own rule for a caller's request id (services/rpc/interceptors/request_id.py): a plain token.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BEARER = "bearer "
# A day: a larger X-Deadline-Ms is a mistake, not a budget.
_MAX_DEADLINE_MS = 86_400_000


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return Response(data, status_code=status, headers=headers, media_type="application/json")


@dataclass
class _Call:
    """One HTTP request's gRPC side: the metadata it passes on and the deadline it shares across its calls."""

    metadata: tuple[tuple[str, str], ...]
    deadline: float | None  # time.monotonic()
    request_id: str
    bearer: bool

    def timeout(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise HttpError(504, grpc.StatusCode.DEADLINE_EXCEEDED.name, "the deadline (X-Deadline-Ms) was spent")
        return remaining


class HttpFace:
    """The ASGI app over one gRPC channel to the gateway's own server (``channel``)."""

    def __init__(self, settings: Settings, channel: grpc.aio.Channel) -> None:
        gateway = settings.gateway
        self.auth = settings.security.auth
        self.max_body_bytes = gateway.http_max_body_bytes
        self.score_max_items = gateway.http_score_max_items
        self.score_max_masks = gateway.http_score_max_masks
        self.score_in_flight = max(1, gateway.http_score_in_flight)
        # The API description is open like reflection, and closed with it (security.reflection_requires_token).
        self.openapi_open = not settings.security.reflection_requires_token
        self._openapi: bytes | None = None
        self._stubs = {
            rpc.method: channel.unary_unary(
                rpc.full_method,
                request_serializer=rpc.request.SerializeToString,
                response_deserializer=rpc.response.FromString,
            )
            for rpc in V1_ROUTES.values()
        }
        routes = [
            Route("/score", self.post_score, methods=["POST"]),
            *[Route(f"/v1/{name}", self._v1(rpc), methods=["POST"]) for name, rpc in V1_ROUTES.items()],
            Route("/openapi.json", self.get_openapi, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # Plumbing shared by the routes.

    def _begin(self, request: Request) -> _Call:
        headers = request.headers
        metadata: list[tuple[str, str]] = []
        authorization = headers.get("authorization", "")
        if authorization:
            metadata.append(("authorization", authorization))
        caller_id = headers.get(REQUEST_ID_KEY, "")
        request_id = caller_id if _PLAIN_ID.match(caller_id) else uuid.uuid4().hex[:16]
        metadata.append((REQUEST_ID_KEY, request_id))
        deadline = None
        text = headers.get(DEADLINE_HEADER)
        if text is not None:
            if not text.strip().isdigit() or not 0 < int(text) <= _MAX_DEADLINE_MS:
                raise bad_request(f"X-Deadline-Ms must be whole milliseconds from 1 to {_MAX_DEADLINE_MS}")
            deadline = time.monotonic() + int(text) / 1000.0
        if request.client is not None:
            # Who is really calling, for the audit trail: the gateway sees this socket's peer, not the HTTP client's.
            # gRPC's peer form; honoured only on calls that arrive over the face's own Unix socket.
            host, port = request.client.host, request.client.port
            metadata.append((FORWARDED_PEER_KEY, f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"))
        bearer = authorization[: len(_BEARER)].lower() == _BEARER
        return _Call(tuple(metadata), deadline, request_id, bearer)

    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            limit = self.max_body_bytes
            raise too_large(f"the body is {int(declared)} bytes; at most {limit} (gateway.http_max_body_bytes)")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large(f"the body is over {self.max_body_bytes} bytes (gateway.http_max_body_bytes)")
            chunks.append(chunk)
        if not size:
            raise bad_request("the body is empty; it must be a JSON object")
        try:
            return json.loads(b"".join(chunks))
        except json.JSONDecodeError as exc:  # position and reason only: never the text around it
            where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            raise bad_request(f"the body is not valid JSON ({where})") from None
        except (UnicodeDecodeError, RecursionError):
            raise bad_request("the body is not valid JSON (not UTF-8, or nested too deeply)") from None

    async def _invoke(self, rpc: Rpc, message: Message, call: _Call, *, where: str = "") -> Message:
        """One call of the gateway's own server, as the HTTP caller (its token, request id and deadline)."""
        try:
            return await self._stubs[rpc.method](message, metadata=call.metadata, timeout=call.timeout())
        except grpc.aio.AioRpcError as exc:
            raise HttpError.from_grpc(exc.code(), exc.details() or exc.code().name, where=where) from None

    async def _refuse_without_token(self, rpc: Rpc, call: _Call) -> None:
        """No bearer token: let the chain refuse (and audit) the call before the body is read at all."""
        if self.auth and not call.bearer:
            await self._invoke(rpc, rpc.request(), call)

    async def _serve(self, request: Request, work: Callable[[_Call], Awaitable[Response]]) -> Response:
        request_id = ""
        try:
            call = self._begin(request)
            request_id = call.request_id
            return await work(call)
        except HttpError as exc:
            error = exc
        except Exception as exc:  # a bug here: the gateway's rule, an incident id to quote and no traceback out
            incident = uuid.uuid4().hex[:12]
            log.error("internal error %s in the HTTP face: %s", incident, type(exc).__name__, exc_info=True)
            error = HttpError(500, "INTERNAL", f"internal error (incident {incident})")
        request_id = request_id or uuid.uuid4().hex[:16]
        if not error.rpc:
            self._note_refusal(request.url.path, error, request_id)
        return _json(error.body(request_id), error.status, {**error.headers, "X-Request-Id": request_id})

    def _note_refusal(self, path: str, exc: HttpError, request_id: str) -> None:
        """A refusal made here, before any gRPC call: the access log and the request count still see it."""
        REQUESTS.labels(rpc=f"http{path}", code=exc.code).inc()
        fields = {"event": "http", "route": path, "status": exc.status, "code": exc.code, "request_id": request_id}
        log.info("HTTP %s %d %s request_id=%s: %s", path, exc.status, exc.code, request_id, exc.message, extra=fields)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route, wrong method) as JSON errors like every other."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(status, "INVALID_ARGUMENT")
        message = "no such route (POST /score, POST /v1/classify|detect|segment|analyze, GET /openapi.json)"
        if status == 405:
            message = "this route takes POST (GET /openapi.json describes every route)"
        headers = dict(getattr(exc, "headers", None) or {})
        return _json(HttpError(status, code, message).body(""), status, headers)

    # Routes.

    def _v1(self, rpc: Rpc) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async def work(call: _Call) -> Response:
                await self._refuse_without_token(rpc, call)
                body = await self._read_json(request)
                try:
                    message = protojson.parse(rpc.request, body)
                except protojson.JsonFieldError as exc:
                    raise bad_request(f"the body is not a valid {rpc.request.DESCRIPTOR.full_name}: {exc}") from None
                response = await self._invoke(rpc, message, call)
                body = protojson.to_json(response)
                return Response(body, headers={"X-Request-Id": call.request_id}, media_type="application/json")

            return await self._serve(request, work)

        return endpoint

    async def post_score(self, request: Request) -> Response:
        async def work(call: _Call) -> Response:
            await self._refuse_without_token(SEGMENT, call)
            body = await self._read_json(request)
            try:
                items = score.parse_score_request(body, max_items=self.score_max_items, max_masks=self.score_max_masks)
            except RequestTooLarge as exc:
                raise too_large(str(exc)) from None
            except BadRequest as exc:
                raise bad_request(str(exc)) from None
            answers = await self._score_items(items, call)
            body = score.score_answers(answers)
            return Response(body, headers={"X-Request-Id": call.request_id}, media_type="application/json")

        return await self._serve(request, work)

    async def _score_items(self, items: list[score.ScoreItem], call: _Call) -> list[list[bytes]]:
        """Every item as its own Segment call, a few at once; the first failure ends the request (and the rest)."""
        answers: list[list[bytes]] = [[] for _ in items]
        gate = asyncio.Semaphore(self.score_in_flight)

        async def one(index: int) -> None:
            async with gate:
                response = await self._invoke(
                    SEGMENT, score.segment_request(items[index]), call, where=f"input_data.data[{index}]"
                )
            answers[index] = score.score_answer(cast(pb.SegmentResponse, response))

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(len(items)):
                    group.create_task(one(index))
        except* HttpError as failures:
            raise failures.exceptions[0] from None
        return answers

    async def get_openapi(self, request: Request) -> Response:
        if not self.openapi_open:
            error = HttpError(404, "NOT_FOUND", "not served while security.reflection_requires_token is on")
            return _json(error.body(""), 404)
        if self._openapi is None:
            self._openapi = json.dumps(openapi.document(), indent=1).encode()
        return Response(self._openapi, media_type="application/json")
