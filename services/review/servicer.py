"""The Review servicer: A2I's human-loop API over the review store, plus live case streams to reviewers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.flows import FlowDefinition, InvalidArgument, TaskType, conditions_to_json, validate_answer
from services.review.output import write_output
from services.review.store import AlreadyExists, Delivery, InvalidState, Loop, LoopStatus, NotFound, ReviewStore

log = logging.getLogger("medgate.review")

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidState, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
)
_STATUS = {
    LoopStatus.IN_PROGRESS: pb.HUMAN_LOOP_STATUS_IN_PROGRESS,
    LoopStatus.COMPLETED: pb.HUMAN_LOOP_STATUS_COMPLETED,
    LoopStatus.FAILED: pb.HUMAN_LOOP_STATUS_FAILED,
    LoopStatus.STOPPED: pb.HUMAN_LOOP_STATUS_STOPPED,
    LoopStatus.STOPPING: pb.HUMAN_LOOP_STATUS_STOPPING,
}
_TASK_TYPE = {
    TaskType.CLASSIFICATION: pb.TASK_TYPE_CLASSIFICATION,
    TaskType.DETECTION: pb.TASK_TYPE_DETECTION,
    TaskType.SEGMENTATION: pb.TASK_TYPE_SEGMENTATION,
}
IMAGE_NAME = "image.png"
MASKS_NAME = "masks.packbits"
MODEL_SIZE = 1024

T = TypeVar("T")


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def loop_proto(loop: Loop) -> pb.HumanLoop:
    return pb.HumanLoop(
        name=loop.name,
        flow_definition=loop.flow,
        status=_STATUS[loop.status],
        creation_time=_timestamp(loop.created_at),
        failure_code=loop.failure_code or "",
        failure_reason=loop.failure_reason or "",
        output_path=loop.output_path or "",
        answers=loop.answers,
        task_count=loop.task_count,
    )


def flow_proto(flow: FlowDefinition) -> pb.FlowDefinition:
    conditions = flow.activation_conditions
    return pb.FlowDefinition(
        name=flow.name,
        task_type=_TASK_TYPE[flow.task_type],
        categories=list(flow.categories),
        task_count=flow.task_count,
        task_availability_lifetime_seconds=int(flow.task_availability_lifetime_s),
        task_time_limit_seconds=int(flow.task_time_limit_s),
        activation_conditions_json=json.dumps(conditions_to_json(conditions)) if conditions else "",
        output_path=str(flow.output_dir or ""),
    )


def answer_content(flow: FlowDefinition, loop: Loop, answer: pb.ReviewAnswer) -> dict[str, Any]:
    """A2I's answerContent for a reviewer's answer; boxes are in the 1024 image the reviewer saw."""
    kind = answer.WhichOneof("answer")
    content: dict[str, Any]
    if kind is None:
        raise InvalidArgument("the answer is empty: accept, reject, or give a label, boxes or a mask")
    if kind == "reject_reason":
        content = {"rejected": True, "reason": answer.reject_reason}
    elif kind == "accept":
        if not answer.accept:
            raise InvalidArgument("accept must be true (use reject_reason to reject)")
        content = _accepted(flow, loop)
    elif kind == "label":
        content = {"label": answer.label}
    elif kind == "boxes":
        content = _boxes_answer([_detection_dict(d) for d in answer.boxes.boxes])
    else:
        mask = answer.mask
        if list(mask.shape) not in ([MODEL_SIZE, MODEL_SIZE], [1, MODEL_SIZE, MODEL_SIZE]):
            raise InvalidArgument(f"a corrected mask must be {MODEL_SIZE}x{MODEL_SIZE}, got {list(mask.shape)}")
        content = {
            "mask": {
                "data": base64.b64encode(mask.data).decode(),
                "shape": list(mask.shape),
                "dtype": mask.dtype or "uint8",
                "encoding": ipb.ArrayEncoding.Name(mask.encoding),
            }
        }
    if answer.comment:
        content["comment"] = answer.comment
    validate_answer(flow, content)
    return content


def _detection_dict(detection: ipb.Detection) -> dict[str, Any]:
    box = detection.model_box if detection.HasField("model_box") else detection.box
    return {"label": detection.label, "x0": box.x0, "y0": box.y0, "x1": box.x1, "y1": box.y1}


def _boxes_answer(boxes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "annotatedResult": {
            "boundingBoxes": [
                {
                    "label": b["label"],
                    "left": round(b["x0"], 2),
                    "top": round(b["y0"], 2),
                    "width": round(b["x1"] - b["x0"], 2),
                    "height": round(b["y1"] - b["y0"], 2),
                }
                for b in boxes
            ],
            "inputImageProperties": {"width": MODEL_SIZE, "height": MODEL_SIZE},
        }
    }


def _accepted(flow: FlowDefinition, loop: Loop) -> dict[str, Any]:
    """Accept-as-is, written as the answer the reviewer would have drawn, so exports need no special case."""
    content = loop.input_content
    if flow.task_type is TaskType.CLASSIFICATION:
        scores = content.get("classification", {}).get("scores", [])
        if not scores:
            raise InvalidArgument("this case has no model classification to accept")
        return {"label": scores[0]["label"], "accepted": True}
    if flow.task_type is TaskType.DETECTION:
        boxes = []
        for det in content.get("detection", {}).get("detections", []):
            mb = det.get("modelBox", det.get("model_box", {}))
            boxes.append(
                {
                    "label": det.get("label", ""),
                    "x0": mb.get("x0", 0.0),
                    "y0": mb.get("y0", 0.0),
                    "x1": mb.get("x1", 0.0),
                    "y1": mb.get("y1", 0.0),
                }
            )
        answer = _boxes_answer(boxes)
        answer["accepted"] = True
        return answer
    return {"accepted": True}


class ReviewServicer(pb_grpc.ReviewServicer):
    """Every store call runs on ``executor`` (SQLite commits fsync); streams wake on the store's notifications."""

    def __init__(
        self,
        store: ReviewStore,
        flows: Mapping[str, FlowDefinition],
        executor: Executor,
        *,
        max_in_flight_per_reviewer: int = 10,
    ) -> None:
        self.store = store
        self.flows = dict(flows)
        self.executor = executor
        self.max_in_flight = max_in_flight_per_reviewer
        self._wakeups: set[asyncio.Event] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake streams on ``loop`` whenever the store may have new work."""
        self._loop = loop
        self._unsubscribe = self.store.subscribe(lambda _version: loop.call_soon_threadsafe(self._wake_all))

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _wake_all(self) -> None:
        for event in list(self._wakeups):
            event.set()

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        """The review boundary: store errors become their status codes; anything else INTERNAL."""
        try:
            return await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for exc_type, code in _CODES:
                if isinstance(exc, exc_type):
                    await context.abort(code, str(exc))
            log.exception("review internal error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the review service")
            raise AssertionError("unreachable") from None

    def _flow(self, name: str) -> FlowDefinition:
        flow = self.flows.get(name)
        if flow is None:
            raise NotFound(f"flow definition {name!r} not found")
        return flow

    # --- flows ---------------------------------------------------------------------------------

    async def DescribeFlowDefinition(
        self, request: pb.DescribeFlowDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlowDefinition:
        async def work() -> pb.FlowDefinition:
            return flow_proto(self._flow(request.name))

        return await self._call(context, work)

    async def ListFlowDefinitions(
        self, request: pb.ListFlowDefinitionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFlowDefinitionsResponse:
        return pb.ListFlowDefinitionsResponse(flow_definitions=[flow_proto(f) for f in self.flows.values()])

    # --- loops ---------------------------------------------------------------------------------

    async def StartHumanLoop(
        self, request: pb.StartHumanLoopRequest, context: grpc.aio.ServicerContext
    ) -> pb.HumanLoop:
        async def work() -> pb.HumanLoop:
            flow = self._flow(request.flow_definition)
            try:
                content = json.loads(request.input_content_json or "{}")
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"input_content_json is not valid JSON: {exc.msg}") from None
            if not isinstance(content, dict):
                raise InvalidArgument("input_content_json must be a JSON object")
            images = {IMAGE_NAME: request.image_png} if request.image_png else {}
            if request.masks_packbits:
                images[MASKS_NAME] = request.masks_packbits
            input_hash = str(content.get("inputHash", "")) or request.name
            loop = await self._run(
                lambda: self.store.start_loop(flow, request.name, content, input_hash, images=images or None)
            )
            return loop_proto(loop)

        return await self._call(context, work)

    async def DescribeHumanLoop(
        self, request: pb.DescribeHumanLoopRequest, context: grpc.aio.ServicerContext
    ) -> pb.HumanLoop:
        async def work() -> pb.HumanLoop:
            return loop_proto(await self._run(lambda: self.store.describe(request.name)))

        return await self._call(context, work)

    async def ListHumanLoops(
        self, request: pb.ListHumanLoopsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListHumanLoopsResponse:
        async def work() -> pb.ListHumanLoopsResponse:
            after = (
                request.creation_time_after.ToNanoseconds() / 1e9 if request.HasField("creation_time_after") else None
            )
            before = (
                request.creation_time_before.ToNanoseconds() / 1e9 if request.HasField("creation_time_before") else None
            )
            status = next((s for s, v in _STATUS.items() if v == request.status), None)
            loops, token = await self._run(
                lambda: self.store.list(
                    flow=request.flow_definition or None,
                    status=status,
                    created_after=after,
                    created_before=before,
                    ascending=request.sort_order == pb.SORT_ORDER_ASCENDING,
                    max_results=request.max_results or 100,
                    next_token=request.next_token or None,
                )
            )
            return pb.ListHumanLoopsResponse(human_loops=[loop_proto(x) for x in loops], next_token=token or "")

        return await self._call(context, work)

    async def StopHumanLoop(self, request: pb.StopHumanLoopRequest, context: grpc.aio.ServicerContext) -> pb.HumanLoop:
        async def work() -> pb.HumanLoop:
            return loop_proto(await self._run(lambda: self.store.stop(request.name)))

        return await self._call(context, work)

    async def DeleteHumanLoop(
        self, request: pb.DeleteHumanLoopRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteHumanLoopResponse:
        async def work() -> pb.DeleteHumanLoopResponse:
            await self._run(lambda: self.store.delete(request.name))
            return pb.DeleteHumanLoopResponse()

        return await self._call(context, work)

    # --- reviewers -----------------------------------------------------------------------------

    def _case(self, delivery: Delivery) -> pb.ReviewCase:
        loop = delivery.loop
        flow = self.flows.get(loop.flow)
        content = loop.input_content
        images = self.store.images(loop.name)
        case = pb.ReviewCase(
            delivery_id=delivery.delivery_id,
            human_loop_name=loop.name,
            flow_definition=loop.flow,
            task_type=_TASK_TYPE[loop.task_type],
            categories=list(flow.categories) if flow else [],
            lease_expires=_timestamp(delivery.lease_expires_at),
            image_png=images.get(IMAGE_NAME, b""),
            original_width=int(content.get("transform", {}).get("originalWidth", 0)),
            original_height=int(content.get("transform", {}).get("originalHeight", 0)),
            input_content_json=json.dumps(content, sort_keys=True),
        )
        with contextlib.suppress(json_format.ParseError):
            for score in content.get("classification", {}).get("scores", []):
                case.scores.append(json_format.ParseDict(score, ipb.ClassScore(), ignore_unknown_fields=True))
            for det in content.get("detection", {}).get("detections", []):
                case.detections.append(json_format.ParseDict(det, ipb.Detection(), ignore_unknown_fields=True))
            for prompt in content.get("segmentation", {}).get("prompts", []):
                case.prompts.append(json_format.ParseDict(prompt, ipb.PromptResult(), ignore_unknown_fields=True))
        if MASKS_NAME in images and "masksShape" in content:
            case.masks.CopyFrom(
                ipb.NDArray(
                    data=images[MASKS_NAME],
                    shape=content["masksShape"],
                    dtype="uint8",
                    encoding=ipb.ARRAY_ENCODING_PACKBITS,
                )
            )
        return case

    async def StreamCases(
        self, request: pb.StreamCasesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReviewCase]:
        """Re-send this reviewer's open leases, then push new cases the moment they are routed."""
        reviewer = request.reviewer_id
        if not reviewer:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reviewer_id is required")
        flows = list(request.flow_definitions) or list(self.flows)
        unknown = [f for f in flows if f not in self.flows]
        if unknown:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown flow definitions: {', '.join(unknown)}")
        max_in_flight = min(max(request.max_in_flight, 1), self.max_in_flight)
        # Headers now, so a reviewer knows it is subscribed before the first case exists.
        await context.send_initial_metadata(())
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        sent: set[str] = set()
        log.info("reviewer %s subscribed to %s (max in flight %d)", reviewer, ",".join(flows), max_in_flight)
        try:
            for delivery in await self._run(lambda: self.store.open_deliveries(reviewer)):
                sent.add(delivery.delivery_id)
                yield await self._run(lambda d=delivery: self._case(d))  # type: ignore[misc]
            while True:
                wakeup.clear()
                deliveries = await self._run(
                    lambda: self.store.lease(reviewer, flows, max_in_flight=max_in_flight, count=max_in_flight)
                )
                for delivery in deliveries:
                    sent.add(delivery.delivery_id)
                    yield await self._run(lambda d=delivery: self._case(d))  # type: ignore[misc]
                if deliveries:
                    continue
                deadline = await self._run(self.store.next_deadline)
                timeout = None if deadline is None else max(0.05, deadline - time.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=min(timeout or 30.0, 30.0))
        finally:
            self._wakeups.discard(wakeup)
            log.info("reviewer %s disconnected (%d cases sent on this stream)", reviewer, len(sent))

    async def SubmitReview(
        self, request: pb.SubmitReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitReviewResponse:
        async def work() -> pb.SubmitReviewResponse:
            if not request.delivery_id:
                raise InvalidArgument("delivery_id is required")

            def submit() -> tuple[Loop, bool]:
                loop = self.store.loop_of_delivery(request.delivery_id)
                flow = self._flow(loop.flow)
                content = answer_content(flow, loop, request.answer)
                decision = self.store.submit(
                    request.decision_id, request.reviewer_id, content, delivery_id=request.delivery_id
                )
                loop = self.store.describe(loop.name)
                if loop.status is LoopStatus.COMPLETED and not loop.output_path and flow.output_dir is not None:
                    write_output(self.store, loop.name, flow.output_dir)
                    loop = self.store.describe(loop.name)
                return loop, not decision.replayed

            loop, recorded_now = await self._run(submit)
            self._wake_all()  # the reviewer has a free slot now: its stream can lease the next case
            return pb.SubmitReviewResponse(human_loop=loop_proto(loop), recorded_now=recorded_now)

        return await self._call(context, work)

    async def ReleaseCase(
        self, request: pb.ReleaseCaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseCaseResponse:
        async def work() -> pb.ReleaseCaseResponse:
            await self._run(lambda: self.store.release(request.delivery_id, request.reviewer_id))
            return pb.ReleaseCaseResponse()

        return await self._call(context, work)
