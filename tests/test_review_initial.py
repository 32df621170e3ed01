"""initialValueModified for boxes and masks, judged against the model's output kept with the case."""

from __future__ import annotations

import numpy as np

from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from services.review.convert import MASKS_NAME
from services.review.flows import TaskType
from services.review.initial import initial_value_modified
from services.review.store import Loop
from services.review.store.model import LoopStatus


def loop(content: dict[str, object]) -> Loop:
    return Loop(
        name="case",
        flow="flow",
        task_type=TaskType.DETECTION,
        status=LoopStatus.IN_PROGRESS,
        input_content=content,
        input_hash="h",
        image_names=(),
        task_count=1,
        answers=0,
        task_time_limit_s=60.0,
        created_at=0.0,
        expires_at=60.0,
        ended_at=None,
        failure_code=None,
        failure_reason=None,
        output_path=None,
    )


def boxes(*items: tuple[str, list[float]]) -> pb.ReviewAnswer:
    detections = [
        ipb.Detection(label=label, model_box=ipb.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3])) for label, b in items
    ]
    return pb.ReviewAnswer(boxes=pb.LabeledBoxes(boxes=detections))


def test_boxes_kept_within_rounding_are_not_modified_moved_relabelled_added_or_deleted_are() -> None:
    case = loop(
        {"detection": {"detections": [{"label": "lesion", "modelBox": {"x0": 10, "y0": 20, "x1": 110, "y1": 120}}]}}
    )
    assert initial_value_modified(case, boxes(("lesion", [10.3, 20, 110, 119.6])), {}) is False
    assert initial_value_modified(case, boxes(("lesion", [10, 20, 130, 120])), {}) is True  # a corner dragged
    assert initial_value_modified(case, boxes(("nodule", [10, 20, 110, 120])), {}) is True  # relabelled
    assert initial_value_modified(case, boxes(), {}) is True  # deleted
    added = boxes(("lesion", [10, 20, 110, 120]), ("lesion", [500, 500, 600, 600]))
    assert initial_value_modified(case, added, {}) is True
    assert initial_value_modified(case, pb.ReviewAnswer(reject_reason="not reviewable"), {}) is None


def test_masks_are_modified_only_when_a_pixel_changes() -> None:
    model = np.zeros((2, 1024, 1024), np.uint8)
    model[0, 100:200, 100:200] = 1
    model[1, 300:400, 300:400] = 1
    case = loop({"masksShape": [2, 1024, 1024]})
    images = {MASKS_NAME: np.packbits(model).tobytes()}

    def answer(masks: np.ndarray) -> pb.ReviewAnswer:
        wire = ipb.NDArray(
            data=np.packbits(masks).tobytes(),
            shape=list(masks.shape),
            dtype="uint8",
            encoding=ipb.ARRAY_ENCODING_PACKBITS,
        )
        return pb.ReviewAnswer(mask=wire)

    assert initial_value_modified(case, answer(model), images) is False
    painted = model.copy()
    painted[1, 450, 450] = 1
    assert initial_value_modified(case, answer(painted), images) is True
    assert initial_value_modified(case, answer(model.max(axis=0)[np.newaxis]), images) is False  # one mask: the union
