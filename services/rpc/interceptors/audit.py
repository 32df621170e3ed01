"""One audit event per call (and per item a stream delivers), written before the answer leaves: fail closed.

Runs inside the access log and outside the status boundary, so it sees every call's final code,
authentication and authorization refusals included. What each RPC records is in ``RPC_EVENTS``:
inference and report calls are DICOM Instances Accessed (R) with the study and SOP instance UIDs
of the answer's ``image``; review calls name the human loop and flow; lists and describes are
Query; every UNAUTHENTICATED is User Authentication and every PERMISSION_DENIED a Security Alert.
Events carry identifiers and codes only: never request payloads, report text, prompts, header
values or error messages.

HIPAA (45 CFR 164.312(b)) requires audit controls on access to patient data, so an access that
cannot be recorded is not granted: when the event of a successful call (or of a stream item) cannot
be written, the answer is withheld and the call ends UNAVAILABLE. A refusal or error reaches the
caller from the status boundary inside this interceptor, so its event is written as the call ends
(there is nothing to withhold); a write that fails then changes nothing for the caller. Every failed
write is logged as CRITICAL by the writer. A stream has one event per item and one for how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from services.audit import (
    Action,
    ActiveParticipant,
    AuditEvent,
    AuditLog,
    EventID,
    EventType,
    Flow,
    HumanLoop,
    ParticipantRole,
    Query,
    SecurityResource,
    Study,
    node,
    requestor,
)
from services.audit.events import STATUS_NAMES, ParticipantObject, is_name, is_uid
from services.rpc.call import Call, current_call, split_method
from services.rpc.interceptor import RpcInterceptor, StreamBehavior, UnaryBehavior, iterate
from services.security.policy import OPEN_SERVICES, REFLECTION_SERVICES

log = logging.getLogger("medgate.audit")

WITHHELD = "the audit trail could not be written; the answer is withheld"
# As in the access log: a cancel this close to the caller's deadline is the deadline.
_DEADLINE_SLACK_S = 0.1
_SECURITY_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_MAX_TEXT = 256

Objects = tuple[ParticipantObject, ...]
# (request, unary response or None) -> the objects the call touched, as far as they are known.
ObjectsOf = Callable[[Any, Any], Objects]
# A streamed answer -> (its objects, its own status name), or None for an item that is no access.
ItemOf = Callable[[Any], tuple[Objects, str] | None]


@dataclass(frozen=True)
class _Spec:
    event_id: EventID
    action: Action
    objects: ObjectsOf
    item: ItemOf | None = None


def _text(message: Any, name: str) -> str:
    value = getattr(message, name, "")
    return value if isinstance(value, str) else ""


def _loop(name: str) -> Objects:
    return (HumanLoop(name),) if is_name(name) else ()


def _flow(name: str) -> Objects:
    return (Flow(name),) if is_name(name) else ()


def _study(image: Any) -> Objects:
    """The study and SOP instance an answer's ``ImageInfo`` names; UIDs that are not UIDs are dropped."""
    study = _text(image, "study_instance_uid")
    if not is_uid(study):
        return ()
    sop_class, sop_instance = _text(image, "sop_class_uid"), _text(image, "sop_instance_uid")
    instances = ((sop_class, sop_instance),) if is_uid(sop_class) and is_uid(sop_instance) else ()
    return (Study(study, instances=instances),)


def _image_of(response: Any) -> Objects:
    return _study(getattr(response, "image", None)) if response is not None else ()


def _none(request: Any, response: Any) -> Objects:
    return ()


def _item_status(item: Any) -> str:
    if item.WhichOneof("result") == "error":
        name = item.error.code_name
        return name if name in STATUS_NAMES else "UNKNOWN"
    return "OK"


def _analyze_item(item: Any) -> tuple[Objects, str]:
    status = _item_status(item)
    return (_image_of(item.response) if status == "OK" else ()), status


def _impression_item(item: Any) -> tuple[Objects, str]:
    return (), _item_status(item)


def _case_item(case: Any) -> tuple[Objects, str]:
    return (*_loop(case.human_loop_name), *_flow(case.flow_definition)), "OK"


def _query(rpc: str, *more: Objects) -> Objects:
    return (Query(rpc), *(obj for objects in more for obj in objects))


def _loop_of(request: Any, response: Any) -> Objects:
    """The loop the request names (or the answer's ``HumanLoop``), and its flow."""
    loop = response if response is not None and hasattr(response, "flow_definition") else None
    name = _text(loop, "name") or _text(request, "name")
    flow = _text(loop, "flow_definition") or _text(request, "flow_definition")
    return (*_loop(name), *_flow(flow))


def _decided(request: Any, response: Any) -> Objects:
    loop = getattr(response, "human_loop", None) if response is not None else None
    return (*_loop(_text(loop, "name")), *_flow(_text(loop, "flow_definition")))


def _subscribed(request: Any, response: Any) -> Objects:
    flows = getattr(request, "flow_definitions", ())
    return tuple(obj for name in flows if isinstance(name, str) for obj in _flow(name))


_INFERENCE = _Spec(EventID.INSTANCES_ACCESSED, Action.READ, lambda request, response: _image_of(response))
_REPORT = _Spec(EventID.INSTANCES_ACCESSED, Action.READ, _none)  # report text is patient data: no objects
_R = "/medgate.v1.Review/"
# Every RPC of every medgate service (a test holds this to the service descriptors).
RPC_EVENTS: dict[str, _Spec] = {
    "/medgate.v1.Inference/Classify": _INFERENCE,
    "/medgate.v1.Inference/Detect": _INFERENCE,
    "/medgate.v1.Inference/Segment": _INFERENCE,
    "/medgate.v1.Inference/Analyze": _INFERENCE,
    "/medgate.v1.Inference/AnalyzeStream": _Spec(EventID.INSTANCES_ACCESSED, Action.READ, _none, _analyze_item),
    "/medgate.v1.Report/Impression": _REPORT,
    "/medgate.v1.Report/ImpressionStream": _Spec(EventID.INSTANCES_ACCESSED, Action.READ, _none, _impression_item),
    f"{_R}DescribeFlowDefinition": _Spec(
        EventID.QUERY, Action.READ, lambda q, a: _query(f"{_R}DescribeFlowDefinition", _flow(_text(q, "name")))
    ),
    f"{_R}ListFlowDefinitions": _Spec(EventID.QUERY, Action.READ, lambda q, a: _query(f"{_R}ListFlowDefinitions")),
    f"{_R}StartHumanLoop": _Spec(EventID.INSTANCES_ACCESSED, Action.CREATE, _loop_of),
    f"{_R}DescribeHumanLoop": _Spec(
        EventID.QUERY, Action.READ, lambda q, a: _query(f"{_R}DescribeHumanLoop", _loop_of(q, a))
    ),
    f"{_R}ListHumanLoops": _Spec(
        EventID.QUERY, Action.READ, lambda q, a: _query(f"{_R}ListHumanLoops", _flow(_text(q, "flow_definition")))
    ),
    # Stopping keeps the loop and its answers (it can still be described): an update, not a deletion.
    f"{_R}StopHumanLoop": _Spec(EventID.INSTANCES_ACCESSED, Action.UPDATE, _loop_of),
    f"{_R}DeleteHumanLoop": _Spec(EventID.INSTANCES_ACCESSED, Action.DELETE, _loop_of),
    f"{_R}StreamCases": _Spec(EventID.INSTANCES_ACCESSED, Action.READ, _subscribed, _case_item),
    f"{_R}SubmitReview": _Spec(EventID.INSTANCES_ACCESSED, Action.UPDATE, _decided),
    f"{_R}ReleaseCase": _Spec(EventID.INSTANCES_ACCESSED, Action.UPDATE, _none),  # names a lease, not a loop
    f"{_R}RenewLease": _Spec(EventID.INSTANCES_ACCESSED, Action.UPDATE, _none),
}
# An RPC nobody listed here is still recorded, as an Execute of the application.
_UNLISTED = _Spec(EventID.INSTANCES_ACCESSED, Action.EXECUTE, _none)


def _safe(value: str) -> str:
    """Identity fields come from verified tokens and certificates; still, keep them printable and bounded."""
    return "".join(c for c in value if c.isprintable())[:_MAX_TEXT]


def _cert_subject(context: grpc.aio.ServicerContext) -> str:
    """The client certificate's subject under mutual TLS, for callers refused before an identity was made."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # pragma: no cover - grpc raises only on a closed call
        return ""
    names = auth.get("x509_subject") or auth.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else ""


def _final_code(call: Call, exc: BaseException | None) -> grpc.StatusCode:
    """The code the caller gets (the status boundary inside us has set it for any failure it mapped)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        late = call.caller_deadline is not None and time.monotonic() >= call.caller_deadline - _DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
    if exc is not None and call.code is grpc.StatusCode.OK:
        return grpc.StatusCode.INTERNAL
    return call.code


class AuditInterceptor(RpcInterceptor):
    def __init__(self, audit: AuditLog) -> None:
        super().__init__()
        self.audit = audit

    def skip(self, full_method: str) -> bool:
        service, _ = split_method(full_method)
        return service in OPEN_SERVICES

    # Events

    def _participants(
        self, call: Call, context: grpc.aio.ServicerContext, query: bool
    ) -> tuple[ActiveParticipant, ...]:
        identity = call.identity
        peer = call.peer or _safe(context.peer() or "")
        if identity is not None:
            who = requestor(
                user_id=_safe(identity.subject),
                issuer=_safe(identity.issuer),
                name=_safe(identity.name),
                roles=tuple(_safe(role) for role in identity.roles),
                peer=identity.peer or peer,
            )
            machine = identity.node
        else:
            who = requestor(peer=peer)
            machine = _cert_subject(context)
        app = self.audit.application.participant(ParticipantRole.DESTINATION if query else ParticipantRole.APPLICATION)
        nodes = (node(_safe(machine), peer=peer),) if machine else ()
        return (who, *nodes, app)

    def _event(
        self,
        full_method: str,
        call: Call,
        context: grpc.aio.ServicerContext,
        spec: _Spec,
        objects: Objects,
        status: grpc.StatusCode | str,
    ) -> AuditEvent:
        name = status if isinstance(status, str) else status.name
        event_id, action = spec.event_id, spec.action
        event_types: tuple[EventType, ...] = ()
        if name == "UNAUTHENTICATED":
            event_id, action, event_types = EventID.USER_AUTHENTICATION, Action.EXECUTE, (EventType.LOGIN,)
            objects = (SecurityResource(full_method),)  # nothing the caller named is trusted yet
        elif name == "PERMISSION_DENIED":
            event_id, action = EventID.SECURITY_ALERT, Action.EXECUTE
            event_types = (EventType.USE_OF_RESTRICTED_FUNCTION,)
            objects = (SecurityResource(full_method), *objects)
        return AuditEvent(
            event_id=event_id,
            action=action,
            status=name,
            event_types=event_types,
            participants=self._participants(call, context, event_id is EventID.QUERY),
            objects=objects,
            rpc=full_method,
            request_id=call.request_id,
        )

    def _objects(self, spec: _Spec, request: Any, response: Any) -> Objects:
        try:
            return spec.objects(request, response)
        except Exception:  # a request the validation interceptor will refuse, e.g. an undecodable one
            log.warning("audit: objects of a call could not be read; the event names none", exc_info=True)
            return ()

    async def _record(self, event: AuditEvent) -> bool:
        try:
            await self.audit.record(event)
        except Exception:
            return False  # the writer has logged it as CRITICAL
        return True

    async def _withhold(self, call: Call, context: grpc.aio.ServicerContext) -> NoReturn:
        call.code, call.message = grpc.StatusCode.UNAVAILABLE, WITHHELD
        await context.abort(grpc.StatusCode.UNAVAILABLE, WITHHELD, trailing_metadata=call.trailer)
        raise AssertionError("unreachable: context.abort raises")

    def _closing(
        self, full_method: str, call: Call, context: Any, spec: _Spec, request: Any, exc: BaseException | None
    ) -> AuditEvent | None:
        """The event of how the call ended (for a stream, besides its items' own events)."""
        code = _final_code(call, exc)
        if _is_reflection(full_method) and code not in _SECURITY_CODES:
            return None
        try:
            return self._event(full_method, call, context, spec, self._objects(spec, request, None), code)
        except Exception:
            log.critical("AUDIT EVENT NOT BUILT for %s %s", full_method, code.name, exc_info=True)
            return None

    async def _failed(
        self, full_method: str, call: Call, context: Any, spec: _Spec, request: Any, exc: BaseException
    ) -> None:
        """Record a failed call; a cancelled one without waiting, as its task is being torn down."""
        event = self._closing(full_method, call, context, spec, request, exc)
        if event is None:
            return
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.audit.submit(event)  # the writer logs a failure; the outcome is decided already
        else:
            await self._record(event)

    # Hooks

    async def unary(
        self, full_method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        call = current_call()
        if call is None:  # no request-id interceptor in front of us (a unit test's bare chain)
            return await behavior(request, context)
        spec = RPC_EVENTS.get(full_method, _UNLISTED)
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            await self._failed(full_method, call, context, spec, request, exc)
            raise
        if _is_reflection(full_method):
            return response
        try:
            event = self._event(full_method, call, context, spec, self._objects(spec, request, response), "OK")
        except Exception:
            log.critical("AUDIT EVENT NOT BUILT for %s; the answer is withheld", full_method, exc_info=True)
            await self._withhold(call, context)
        if not await self._record(event):
            await self._withhold(call, context)
        return response

    async def stream(
        self, full_method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        call = current_call()
        spec = RPC_EVENTS.get(full_method, _UNLISTED)
        items: AsyncGenerator[Any, None] = iterate(behavior, request, context)  # type: ignore[assignment]
        if call is None:
            async for item in items:
                yield item
            return
        withheld = False
        try:
            async for item in items:
                if not await self._item_recorded(full_method, call, context, spec, item):
                    withheld = True  # this item is not delivered
                    break
                yield item
        except BaseException as exc:
            await self._failed(full_method, call, context, spec, request, exc)
            raise
        if withheld:
            await items.aclose()
            await self._withhold(call, context)
        event = self._closing(full_method, call, context, spec, request, None)
        if event is not None:
            await self._record(event)  # every item is recorded already: a failure here withholds nothing

    async def _item_recorded(self, full_method: str, call: Call, context: Any, spec: _Spec, item: Any) -> bool:
        """Record one streamed answer before it is sent; False when it could not be."""
        if spec.item is None:
            return True
        try:
            described = spec.item(item)
        except Exception:
            log.warning("audit: a stream item could not be read; its event names no objects", exc_info=True)
            described = ((), "OK")
        if described is None:
            return True
        objects, status = described
        try:
            event = self._event(full_method, call, context, spec, objects, status)
        except Exception:
            log.critical("AUDIT EVENT NOT BUILT for an item of %s; it is withheld", full_method, exc_info=True)
            return False
        return await self._record(event)


def _is_reflection(full_method: str) -> bool:
    """Reflection answers describe the API, not patient data: only its refusals are recorded."""
    return split_method(full_method)[0] in REFLECTION_SERVICES
