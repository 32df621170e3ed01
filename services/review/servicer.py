"""The Review servicer: A2I's human-loop API over the review store, plus live case streams to reviewers.

Translation only: store errors propagate to the RPC layer (:mod:`services.rpc`), which gives them
their status codes, request ids, incident ids and the access log; messages are built in
:mod:`services.review.convert`. Every store call runs on the executor (SQLite commits fsync).

The reviewer is whom the auth interceptor verified (the call record's identity), keyed in the store
as ``issuer#subject``; the requests' ``reviewer_id`` is used only when tokens are off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from functools import partial
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.completion import dicom_attachments
from services.review.convert import (
    IMAGE_NAME,
    MASKS_NAME,
    MODALITY_NAME,
    case_proto,
    flow_proto,
    loop_proto,
    status_value,
)
from services.review.decide import Reviewer, submit_decision
from services.review.flows import FlowDefinition, InvalidArgument
from services.review.store import Delivery, Loop, LoopStatus, NotFound, NotYourLease, ReviewStoreBase
from services.review.store.waiters import FlowWaiters
from services.rpc.call import current_call

log = logging.getLogger("medgate.review")

# A waiting stream looks for work on its own this often, in case a wake-up was lost (a PostgreSQL
# listener that reconnected announces that itself); events, not this, deliver cases.
IDLE_RECHECK_S = 30.0
# A stream that leased nothing while its flows still have work (another stream held those rows, or they
# are cases this reviewer cannot take) looks again after this, doubling up to IDLE_RECHECK_S: no
# new-case event will come for work that is already queued.
BUSY_RECHECK_S = 0.05

T = TypeVar("T")


def reviewer_of(requested: str) -> Reviewer:
    """The caller as a reviewer: its verified token, or (tokens off) the request's ``reviewer_id``.

    With a token, ``requested`` may be empty, the subject or ``issuer#subject``; any other value is
    somebody else, refused rather than replaced, so a client that thinks it is someone else finds out.
    """
    call = current_call()
    identity = call.identity if call is not None else None
    if identity is None:
        if not requested:
            raise InvalidArgument("reviewer_id is required")
        return Reviewer(requested)
    if requested and requested not in (identity.subject, identity.principal):
        raise NotYourLease("reviewer_id names another reviewer than the token's subject (leave it empty)")
    return Reviewer(identity.principal, identity.issuer, identity.subject)


class ReviewServicer(pb_grpc.ReviewServicer):
    """Streams wake on the store's work events (one waiting reviewer per new case); everything else is
    one store call per RPC."""

    def __init__(
        self,
        store: ReviewStoreBase,
        flows: Mapping[str, FlowDefinition],
        executor: Executor,
        *,
        max_in_flight_per_reviewer: int = 10,
    ) -> None:
        self.store = store
        self.flows = dict(flows)
        self.executor = executor
        self.max_in_flight = max_in_flight_per_reviewer
        self.waiters = FlowWaiters()
        self._unsubscribe: Callable[[], None] | None = None
        # Called on the event loop after a decision completed its loop: wakes the verified DICOM result's worker.
        self.on_completed: Callable[[], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the store's work events (from store threads, or another replica) to the waiters on ``loop``."""
        self._unsubscribe = self.store.listen(lambda event: loop.call_soon_threadsafe(self.waiters.dispatch, event))

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    def _flow(self, name: str) -> FlowDefinition:
        flow = self.flows.get(name)
        if flow is None:
            raise NotFound("flow definition not found (ListFlowDefinitions names them)")
        return flow

    # --- flows ---------------------------------------------------------------------------------

    async def DescribeFlowDefinition(
        self, request: pb.DescribeFlowDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlowDefinition:
        return flow_proto(self._flow(request.name))

    async def ListFlowDefinitions(
        self, request: pb.ListFlowDefinitionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFlowDefinitionsResponse:
        return pb.ListFlowDefinitionsResponse(flow_definitions=[flow_proto(f) for f in self.flows.values()])

    # --- loops ---------------------------------------------------------------------------------

    async def StartHumanLoop(
        self, request: pb.StartHumanLoopRequest, context: grpc.aio.ServicerContext
    ) -> pb.HumanLoop:
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
        if request.modality_png:
            images[MODALITY_NAME] = request.modality_png
        if request.HasField("dicom") and request.dicom.data:
            images.update(dicom_attachments(request.dicom))  # for the verified DICOM result on completion
        input_hash = str(content.get("inputHash", "")) or request.name
        loop = await self._run(
            lambda: self.store.start_loop(flow, request.name, content, input_hash, images=images or None)
        )
        return loop_proto(loop)

    async def DescribeHumanLoop(
        self, request: pb.DescribeHumanLoopRequest, context: grpc.aio.ServicerContext
    ) -> pb.HumanLoop:
        return loop_proto(await self._run(lambda: self.store.describe(request.name)))

    async def ListHumanLoops(
        self, request: pb.ListHumanLoopsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListHumanLoopsResponse:
        after = request.creation_time_after.ToNanoseconds() / 1e9 if request.HasField("creation_time_after") else None
        before = (
            request.creation_time_before.ToNanoseconds() / 1e9 if request.HasField("creation_time_before") else None
        )
        if request.max_results < 0:
            raise InvalidArgument(f"max_results must be 0 (the default, 100) or more, got {request.max_results}")
        loops, token = await self._run(
            lambda: self.store.list(
                flow=request.flow_definition or None,
                status=status_value(request.status),
                created_after=after,
                created_before=before,
                ascending=request.sort_order == pb.SORT_ORDER_ASCENDING,
                max_results=request.max_results or 100,
                next_token=request.next_token or None,
            )
        )
        return pb.ListHumanLoopsResponse(human_loops=[loop_proto(x) for x in loops], next_token=token or "")

    async def StopHumanLoop(self, request: pb.StopHumanLoopRequest, context: grpc.aio.ServicerContext) -> pb.HumanLoop:
        return loop_proto(await self._run(lambda: self.store.stop(request.name)))

    async def DeleteHumanLoop(
        self, request: pb.DeleteHumanLoopRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteHumanLoopResponse:
        await self._run(lambda: self.store.delete(request.name))
        return pb.DeleteHumanLoopResponse()

    # --- reviewers -----------------------------------------------------------------------------

    def _case(self, delivery: Delivery) -> pb.ReviewCase:
        return case_proto(delivery, self.flows.get(delivery.loop.flow), self.store.images(delivery.loop.name))

    async def StreamCases(
        self, request: pb.StreamCasesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReviewCase]:
        """Re-send this reviewer's open leases, then push new cases the moment they are routed.

        The stream leases when it starts and then only when woken: by a new case of its flows (one
        waiting stream per case) or, when it holds max_in_flight cases, by one of them ending.
        """
        reviewer = reviewer_of(request.reviewer_id).key
        flows = list(request.flow_definitions) or list(self.flows)
        unknown = sum(1 for f in flows if f not in self.flows)
        if unknown:
            raise NotFound(f"{unknown} of the {len(flows)} flow definitions asked for do not exist")
        max_in_flight = min(max(request.max_in_flight, 1), self.max_in_flight)
        # Headers now, so a reviewer knows it is subscribed before the first case exists.
        await context.send_initial_metadata(())
        waiter = self.waiters.register(reviewer, flows)
        sent: set[str] = set()
        recheck_s = BUSY_RECHECK_S
        log.info("reviewer subscribed to %s (max in flight %d)", ",".join(flows), max_in_flight)
        try:
            for delivery in await self._run(lambda: self.store.open_deliveries(reviewer)):
                sent.add(delivery.delivery_id)
                yield await self._run(lambda d=delivery: self._case(d))  # type: ignore[misc]
            while True:
                snapshot = self.waiters.snapshot(waiter)
                batch = await self._run(
                    lambda: self.store.lease_batch(reviewer, flows, max_in_flight=max_in_flight, count=max_in_flight)
                )
                token = waiter.token
                if token is not None:
                    # Woken for a case: took something, or could not take it (answered or released it before,
                    # or filled up) while the flow still has work: then the next waiting reviewer gets a turn.
                    depth = partial(self.store.queue_depth, token.flow)
                    if not batch.deliveries and await self._run(depth) > 0:
                        self.waiters.decline(waiter, token)
                    self.waiters.taken(waiter)
                for delivery in batch.deliveries:
                    sent.add(delivery.delivery_id)
                    yield await self._run(lambda d=delivery: self._case(d))  # type: ignore[misc]
                timeout_s = IDLE_RECHECK_S
                if batch.deliveries:
                    recheck_s = BUSY_RECHECK_S
                elif batch.free_slots > 0 and await self._run(lambda: self._queued(flows)) > 0:
                    timeout_s, recheck_s = recheck_s, min(recheck_s * 2, IDLE_RECHECK_S)
                await self.waiters.wait(waiter, snapshot, full=batch.free_slots == 0, timeout_s=timeout_s)
        finally:
            self.waiters.unregister(waiter)
            log.info("reviewer disconnected (%d cases sent on this stream)", len(sent))

    def _queued(self, flows: list[str]) -> int:
        return sum(self.store.queue_depth(flow) for flow in flows)

    async def SubmitReview(
        self, request: pb.SubmitReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitReviewResponse:
        if not request.delivery_id:
            raise InvalidArgument("delivery_id is required")
        reviewer = reviewer_of(request.reviewer_id)

        def submit() -> tuple[Loop, bool]:
            return submit_decision(
                self.store,
                self.flows,
                reviewer,
                delivery_id=request.delivery_id,
                decision_id=request.decision_id,
                answer=request.answer,
            )

        # The store's work event for this decision wakes the reviewer's stream if it was full.
        loop, recorded_now = await self._run(submit)
        if loop.status is LoopStatus.COMPLETED and self.on_completed is not None:
            self.on_completed()  # the verified DICOM result is built after this answer, off the caller's path
        return pb.SubmitReviewResponse(human_loop=loop_proto(loop), recorded_now=recorded_now)

    async def ReleaseCase(
        self, request: pb.ReleaseCaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseCaseResponse:
        if not request.delivery_id:
            raise InvalidArgument("delivery_id is required")
        reviewer = reviewer_of(request.reviewer_id).key
        await self._run(lambda: self.store.release(request.delivery_id, reviewer))
        return pb.ReleaseCaseResponse()

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewLeaseResponse:
        if not request.delivery_id:
            raise InvalidArgument("delivery_id is required")
        reviewer = reviewer_of(request.reviewer_id).key
        delivery = await self._run(lambda: self.store.renew(request.delivery_id, reviewer))
        lease_expires = Timestamp()
        lease_expires.FromNanoseconds(int(delivery.lease_expires_at * 1e9))
        return pb.RenewLeaseResponse(lease_expires=lease_expires)
