"""Did the reviewer change what the model proposed? A2I's ``initialValueModified``, judged on the server.

One judgement for every way a decision arrives (SubmitReview over gRPC, the reviewer page), against the
model's own output kept with the case: the top class, the boxes (within :data:`BOX_TOLERANCE_PX`), the
masks (pixel for pixel). Pure: no gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from services.imaging.preprocess import MODEL_SIZE
from services.review.convert import MASKS_NAME
from services.review.masks import wire_masks
from services.review.store import Loop

# A moved box corner under this many model pixels is rounding, not a correction.
BOX_TOLERANCE_PX = 0.5


def model_boxes(loop: Loop) -> list[tuple[str, list[float]]]:
    """The model's boxes of a case, (label, [x0, y0, x1, y1]) in the 1024x1024 model image."""
    boxes = []
    for det in loop.input_content.get("detection", {}).get("detections", []):
        mb = det.get("modelBox", det.get("model_box", {}))
        boxes.append((str(det.get("label", "")), [float(mb.get(k, 0.0)) for k in ("x0", "y0", "x1", "y1")]))
    return boxes


def boxes_modified(loop: Loop, boxes: Sequence[ipb.Detection]) -> bool:
    model = model_boxes(loop)
    if len(model) != len(boxes):
        return True
    for (label, coords), det in zip(model, boxes, strict=True):
        box = det.model_box if det.HasField("model_box") else det.box
        mine = [box.x0, box.y0, box.x1, box.y1]
        if label != det.label or any(abs(a - b) > BOX_TOLERANCE_PX for a, b in zip(coords, mine, strict=True)):
            return True
    return False


def model_masks(images: Mapping[str, bytes], loop: Loop) -> np.ndarray:
    """The model's masks of a case (prompts x 1024 x 1024, 0/1); none when the case kept none."""
    shape = [int(v) for v in loop.input_content.get("masksShape", [])]
    data = images.get(MASKS_NAME)
    if data is None or len(shape) != 3 or shape[1:] != [MODEL_SIZE, MODEL_SIZE]:
        return np.zeros((0, MODEL_SIZE, MODEL_SIZE), np.uint8)
    return np.unpackbits(np.frombuffer(data, np.uint8))[: int(np.prod(shape))].reshape(shape)


def initial_value_modified(loop: Loop, answer: pb.ReviewAnswer, images: Mapping[str, bytes]) -> bool | None:
    """Whether ``answer`` changes the model's proposal; None for a rejection (nothing was kept or changed).

    ``images``: the case's stored images (its masks), read only for a mask answer.
    """
    kind = answer.WhichOneof("answer")
    if kind == "accept":
        return False
    if kind == "label":
        scores = loop.input_content.get("classification", {}).get("scores", [])
        return not scores or scores[0].get("label") != answer.label
    if kind == "boxes":
        return boxes_modified(loop, answer.boxes.boxes)
    if kind == "mask":
        given = wire_masks(answer.mask, MODEL_SIZE).astype(bool)
        model = model_masks(images, loop).astype(bool)
        if given.shape[0] == 1 and model.shape[0] > 1:  # one mask for the whole case: the union of the model's
            model = model.any(axis=0, keepdims=True)
        return given.shape != model.shape or not np.array_equal(given, model)
    return None
