"""Protobuf <-> review domain values: loops, flows, cases, and a reviewer's answer as A2I's answerContent.

Pure translation (no gRPC): the servicer calls these and nothing else builds review messages.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from services.imaging.preprocess import MODEL_SIZE
from services.review.flows import FlowDefinition, InvalidArgument, TaskType, conditions_to_json, validate_answer
from services.review.masks import labeled_image, wire_masks
from services.review.output import output_key
from services.review.store import Delivery, Loop, LoopStatus

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
# The 16-bit modality values of a grey DICOM case (StartHumanLoopRequest.modality_png).
MODALITY_NAME = "modality.png"


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def loop_proto(loop: Loop) -> pb.HumanLoop:
    """A loop as A2I describes it; ``output_path`` is the output.json's key under its flow's output folder."""
    return pb.HumanLoop(
        name=loop.name,
        flow_definition=loop.flow,
        status=_STATUS[loop.status],
        creation_time=_timestamp(loop.created_at),
        failure_code=loop.failure_code or "",
        failure_reason=loop.failure_reason or "",
        output_path=str(output_key(loop)) if loop.output_path else "",
        answers=loop.answers,
        task_count=loop.task_count,
        verified_dicom_state=loop.dicom_state or "",
        verified_dicom_note=loop.dicom_note or "",
    )


def flow_proto(flow: FlowDefinition) -> pb.FlowDefinition:
    """A flow as A2I describes it; ``output_path`` names the output folder without saying where it is."""
    conditions = flow.activation_conditions
    return pb.FlowDefinition(
        name=flow.name,
        task_type=_TASK_TYPE[flow.task_type],
        categories=list(flow.categories),
        task_count=flow.task_count,
        task_availability_lifetime_seconds=int(flow.task_availability_lifetime_s),
        task_time_limit_seconds=int(flow.task_time_limit_s),
        activation_conditions_json=json.dumps(conditions_to_json(conditions)) if conditions else "",
        output_path=flow.output_dir.name if flow.output_dir is not None else "",
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
        masks = wire_masks(mask, MODEL_SIZE)
        prompts = [str(p.get("prompt", "")) for p in content_prompts(loop)]
        if len(mask.shape) == 3 and masks.shape[0] > 1 and masks.shape[0] != len(prompts):
            raise InvalidArgument(f"this case has {len(prompts)} prompts; a corrected mask per prompt needs as many")
        labels = prompts if masks.shape[0] == len(prompts) else ["foreground"]
        content = {
            "mask": {
                "data": base64.b64encode(mask.data).decode(),
                "shape": list(mask.shape),
                "dtype": mask.dtype or "uint8",
                "encoding": ipb.ArrayEncoding.Name(mask.encoding),
            },
            # A2I's semantic-segmentation answer: one colour per prompt in a PNG.
            "annotatedResult": labeled_image(masks, [label or f"mask {i + 1}" for i, label in enumerate(labels)]),
        }
    if answer.comment:
        content["comment"] = answer.comment
    validate_answer(flow, content)
    return content


def content_prompts(loop: Loop) -> list[dict[str, Any]]:
    """The segmentation prompts of a case's input content, in mask order."""
    prompts = loop.input_content.get("segmentation", {}).get("prompts", [])
    return [p for p in prompts if isinstance(p, dict)] if isinstance(prompts, list) else []


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


def status_value(status: int) -> LoopStatus | None:
    """The store's status for a proto status filter (UNSPECIFIED: no filter)."""
    return next((s for s, v in _STATUS.items() if v == status), None)


def case_proto(delivery: Delivery, flow: FlowDefinition | None, images: Mapping[str, bytes]) -> pb.ReviewCase:
    """What a reviewer's stream receives: the image, the model's answer to check, and the lease."""
    loop = delivery.loop
    content = loop.input_content
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
        reviewer_id=delivery.reviewer_id,
        modality_png=images.get(MODALITY_NAME, b""),
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
