"""A reviewer's decision, recorded one way whoever sends it (SubmitReview over gRPC, or the reviewer page).

A2I's answerContent from the answer, with ``initialValueModified`` judged on the server
(:mod:`.initial`), anything the caller adds beside it (the page's per-mask decisions), the flow's
validation, the store's idempotent ``submit``, and the output.json of a loop the decision completed.
Pure: no gRPC; runs on a store thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medgate.v1 import review_pb2 as pb
from services.review.convert import answer_content
from services.review.flows import FlowDefinition, validate_answer
from services.review.initial import initial_value_modified
from services.review.output import write_output
from services.review.store import Loop, LoopStatus, NotFound, ReviewStoreBase


@dataclass(frozen=True)
class Reviewer:
    """Who is reviewing: ``key`` in the store; ``issuer`` and ``subject`` when a token said so."""

    key: str
    issuer: str | None = None
    subject: str | None = None


def flow_of(flows: Mapping[str, FlowDefinition], name: str) -> FlowDefinition:
    flow = flows.get(name)
    if flow is None:
        raise NotFound("flow definition not found (ListFlowDefinitions names them)")
    return flow


def submit_decision(
    store: ReviewStoreBase,
    flows: Mapping[str, FlowDefinition],
    reviewer: Reviewer,
    *,
    delivery_id: str,
    decision_id: str,
    answer: pb.ReviewAnswer | Callable[[Loop], tuple[pb.ReviewAnswer, Mapping[str, Any]]],
) -> tuple[Loop, bool]:
    """Record ``answer`` for a delivery; (the loop now, whether this call recorded it rather than replayed it).

    ``answer`` may be made from the case: ``answer(loop)`` gives the answer and keys to add to its
    answerContent (the page's ``initialValueModified``, per-mask decisions).
    """
    loop = store.loop_of_delivery(delivery_id)
    flow = flow_of(flows, loop.flow)
    extra: Mapping[str, Any] = {}
    if callable(answer):
        answer, extra = answer(loop)
    content = answer_content(flow, loop, answer)
    if extra:
        content |= extra
        validate_answer(flow, content)
    if "initialValueModified" not in content:
        images = store.images(loop.name) if answer.WhichOneof("answer") == "mask" else {}
        modified = initial_value_modified(loop, answer, images)
        if modified is not None:
            content["initialValueModified"] = modified
    decision = store.submit(
        decision_id,
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
