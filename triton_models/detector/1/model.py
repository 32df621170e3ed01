"""Triton Python-backend model ``detector``: CenterNet-style lesion detection with ONNX Runtime.

Self-contained: numpy, onnxruntime, the standard library and ``medgate_model_base.py`` at the repository root;
with config.pbtxt parameter ``runtime: torch``, PyTorch instead of onnxruntime (``medgate_torch_nets.py``, the
same network with the weights of the same ``model.onnx``, on CUDA when torch sees a GPU).
``model.onnx`` next to this file is built by ``python -m training.train_detector``: uint8 image
[B,1,1024,1024] -> boxes [B,32,4] (x0,y0,x1,y1, 1024 model space) and scores [B,32], the top-32
heatmap peaks sorted by score.

Contract (see config.pbtxt): image uint8 [B,1024,1024] -> boxes fp32 [B,32,4], scores fp32 [B,32],
labels int32 [B,32], count int32 [B,1].  Here: drop scores below ``min_score``, non-maximum
suppression at ``nms_iou_threshold`` (both from config.pbtxt parameters), sort by score, pad with
zeros after ``count``; then the kept scores go through ``calibration.json`` (a strictly increasing
Platt map fitted by ``python -m training.fit_calibration``, so order, NMS and AP are unchanged) and say how
often a box of that score is a true lesion at IoU 0.5.  Every request gets exactly one response; all
valid requests of a batch run as one ONNX Runtime call; a bad request gets an error response naming the
problem (never image content) and the rest are still served.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# The shared base sits at the repository root, which the stub does not put on sys.path; a __pycache__ folder
# there would be a model Triton cannot load (see medgate_model_base's docstring).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
from medgate_calibration import Calibration  # noqa: E402
from medgate_model_base import MODEL_SIZE, ImageBatchModel, Outputs, check_images, input_array  # noqa: E402

MAX_DETECTIONS = 32

Detections = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # boxes [32,4], scores [32], labels [32], count


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, in descending score order."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        if not rest.size:
            break
        ix0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        iy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        ix1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        iy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.array(keep, dtype=np.int64)


class TritonPythonModel(ImageBatchModel[None, Detections]):
    default_name = "detector"
    graph_outputs = ("boxes", "scores")
    rebuild = "python -m training.train_detector"
    torch_net = "detector"

    def setup(self, args: dict[str, str]) -> None:
        self.iou_threshold = self.float_param("nms_iou_threshold", 0.5, 0.0, 1.0)
        self.min_score = self.float_param("min_score", 0.05, 0.0, 1.0)  # on the raw score, before calibration
        self.calibration = Calibration.load(self.version_dir)
        super().setup(args)

    def details(self) -> str:
        return f", min_score {self.min_score}, NMS IoU {self.iou_threshold}, {self.calibration.describe()}"

    def parse(self, request: pb_utils.InferenceRequest) -> tuple[np.ndarray, None]:
        return check_images(input_array(request, "image")), None

    def _postprocess(self, boxes: np.ndarray, scores: np.ndarray) -> Detections:
        out_boxes = np.zeros((MAX_DETECTIONS, 4), np.float32)
        out_scores = np.zeros((MAX_DETECTIONS,), np.float32)
        out_labels = np.zeros((MAX_DETECTIONS,), np.int32)
        ok = np.isfinite(scores) & np.isfinite(boxes).all(axis=1) & (scores >= self.min_score)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, self.iou_threshold)[:MAX_DETECTIONS]
        n = len(keep)
        out_boxes[:n] = np.clip(boxes[keep], 0.0, float(MODEL_SIZE))
        out_scores[:n] = self.calibration("scores", scores[keep])
        return out_boxes, out_scores, out_labels, n

    def run_images(self, images: np.ndarray, rows: list[tuple[None, int]]) -> list[Detections]:
        boxes, scores = self.run_graph(["boxes", "scores"], images)
        return [self._postprocess(b, s) for b, s in zip(boxes, scores, strict=True)]

    def respond(self, extra: None, results: list[Detections]) -> Outputs:
        return [
            pb_utils.Tensor("boxes", np.stack([r[0] for r in results])),
            pb_utils.Tensor("scores", np.stack([r[1] for r in results])),
            pb_utils.Tensor("labels", np.stack([r[2] for r in results])),
            pb_utils.Tensor("count", np.array([[r[3]] for r in results], dtype=np.int32)),
        ]
