"""The reviewer page's cases: a case as the page draws it, and the page's answer as a SubmitReview answer.

Every coordinate is in the 1024x1024 image the model saw. Beside the answer the page's decisions record
what A2I records for templates with initial values: ``initialValueModified`` (judged here, on the server,
against the model's own output), and for segmentation the decision and correction of each mask.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import cv2
import numpy as np

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from services.imaging.preprocess import MODEL_SIZE
from services.review.convert import content_prompts
from services.review.flows import InvalidArgument
from services.review.initial import boxes_modified, model_masks
from services.review.store import Loop, ReviewStoreBase

MAX_MASKS = 64
_MASK_BYTES = MODEL_SIZE * MODEL_SIZE // 8


def task_name(task_type: int) -> str:
    return pb.TaskType.Name(task_type).removeprefix("TASK_TYPE_").lower()


def _png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _mask_pngs(masks: ipb.NDArray) -> list[str]:
    """Each mask of a case as a 1-bit-looking PNG (0/255), for the page to tint, draw and paint on."""
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
    """A case as the page draws it. A 16-bit modality image is fetched separately (``modality.url``)."""
    content = json.loads(case.input_content_json or "{}")
    modality = content.get("modalityImage") if case.modality_png else None
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
        "transform": content.get("transform", {}),
        "modality": (
            modality | {"url": f"/api/cases/{case.delivery_id}/modality.png"} if isinstance(modality, dict) else None
        ),
        "scores": [{"label": s.label, "score": round(s.score, 4)} for s in case.scores],
        "detections": [{"label": d.label, "score": round(d.score, 4), "box": _box(d)} for d in case.detections],
        "prompts": [{"prompt": p.prompt, "category": p.category, "score": round(p.score, 4)} for p in case.prompts],
        "masks": _mask_pngs(case.masks),
    }


def decision_id(delivery_id: str) -> str:
    """One decision per delivery: a double click, a retry or a reload replays it instead of deciding twice."""
    return f"web:{delivery_id}"


def _number(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
        raise InvalidArgument(f"{what} must be a number")
    return float(value)


def _edits(value: Any, count: int) -> list[bytes | None]:
    """The page's painted masks: per mask null (untouched) or base64 of np.packbits of a 1024x1024 0/1 mask."""
    if value is None:
        return [None] * count
    if not isinstance(value, list) or len(value) != count:
        raise InvalidArgument("masks.edits must be a list with one entry (null or a painted mask) per mask")
    edits: list[bytes | None] = []
    for i, item in enumerate(value):
        if item is None:
            edits.append(None)
            continue
        try:
            data = base64.b64decode(item, validate=True) if isinstance(item, str) else b""
        except ValueError:
            data = b""
        if len(data) != _MASK_BYTES:
            raise InvalidArgument(f"masks.edits[{i}] must be base64 of a packed {MODEL_SIZE}x{MODEL_SIZE} mask")
        edits.append(data)
    return edits


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
    accepted = answer.get("accepted")
    if kind == "masks" and isinstance(accepted, list) and len(accepted) <= MAX_MASKS:
        if not all(isinstance(v, bool) for v in accepted):
            raise InvalidArgument("masks.accepted must be a list of true/false, one per mask")
        return kind, (accepted, _edits(answer.get("edits"), len(accepted)))
    raise InvalidArgument("answer.kind must be label, boxes, masks, accept or reject, with its value")


def _masks_answer(
    store: ReviewStoreBase, loop: Loop, accepted: list[bool], edits: list[bytes | None]
) -> tuple[pb.ReviewAnswer, dict[str, Any]]:
    """Each mask as the reviewer left it (the model's, painted over, or rejected), one per prompt."""
    model = model_masks(store.images(loop.name), loop)
    if model.shape[0] != len(accepted):
        raise InvalidArgument(f"this case has {model.shape[0]} masks, {len(accepted)} decided")
    final = model.copy()
    for i, data in enumerate(edits):
        if data is not None:
            final[i] = np.unpackbits(np.frombuffer(data, np.uint8)).reshape(MODEL_SIZE, MODEL_SIZE)
    for i, keep in enumerate(accepted):
        if not keep:
            final[i] = 0
    prompts = content_prompts(loop)
    decisions = [
        {
            "prompt": str(prompts[i].get("prompt", "")) if i < len(prompts) else "",
            "category": str(prompts[i].get("category", "")) if i < len(prompts) else "",
            "accepted": keep,
            "corrected": keep and not np.array_equal(final[i], model[i]),
        }
        for i, keep in enumerate(accepted)
    ]
    modified = not np.array_equal(final, model)
    extra = {"initialValueModified": modified, "maskDecisions": decisions}
    if not modified:
        return pb.ReviewAnswer(accept=True), extra
    mask = ipb.NDArray(
        data=np.packbits(final).tobytes(), shape=list(final.shape), dtype="uint8", encoding=ipb.ARRAY_ENCODING_PACKBITS
    )
    return pb.ReviewAnswer(mask=mask), extra


def page_answer(
    store: ReviewStoreBase, loop: Loop, kind: str, value: Any, comment: str
) -> tuple[pb.ReviewAnswer, dict[str, Any]]:
    """The SubmitReview answer for the page's (kind, value), and what A2I records beside it."""
    extra: dict[str, Any] = {}
    if kind == "label":
        answer = pb.ReviewAnswer(label=value)
        scores = loop.input_content.get("classification", {}).get("scores", [])
        extra["initialValueModified"] = not scores or scores[0].get("label") != value
    elif kind == "boxes":
        answer = pb.ReviewAnswer(boxes=pb.LabeledBoxes(boxes=value))
        extra["initialValueModified"] = boxes_modified(loop, value)
    elif kind == "masks":
        answer, extra = _masks_answer(store, loop, *value)
    elif kind == "accept":
        answer = pb.ReviewAnswer(accept=True)
        extra["initialValueModified"] = False
    else:
        answer = pb.ReviewAnswer(reject_reason=value)
    if comment:
        answer.comment = comment
    return answer, extra
