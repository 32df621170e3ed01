"""Triton Python-backend model ``detector``: CenterNet-style lesion detection with ONNX Runtime.

Self-contained: numpy, onnxruntime and the standard library only.  ``model.onnx`` next to this file
is built by ``python -m training.train_detector``: uint8 image [B,1,1024,1024] -> boxes [B,32,4]
(x0,y0,x1,y1, 1024 model space) and scores [B,32], the top-32 heatmap peaks sorted by score.

Contract (see config.pbtxt): image uint8 [B,1024,1024] -> boxes fp32 [B,32,4], scores fp32 [B,32],
labels int32 [B,32], count int32 [B,1].  Here: drop scores below ``min_score``, non-maximum
suppression at ``nms_iou_threshold`` (both from config.pbtxt parameters), sort by score, pad with
zeros after ``count``.  Every request gets exactly one response; all valid requests of a batch run
as one ONNX Runtime call; a bad request gets an error response naming the problem (never image
content) and the rest are still served.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

MODEL_SIZE = 1024
ONNX_FILE = "model.onnx"
MAX_DETECTIONS = 32


class RequestError(ValueError):
    """A problem with one request; answered with an error response for that request only."""


def _param(params: dict, key: str, default: float, low: float, high: float) -> float:
    raw = params.get(key, "")
    try:
        value = float(raw) if raw != "" else default
    except ValueError:
        raise RuntimeError(f"detector: parameter {key}={raw!r} is not a number") from None
    if not (low <= value <= high):
        raise RuntimeError(f"detector: parameter {key}={value} must be within [{low}, {high}]")
    return value


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


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.name = args.get("model_name", "detector")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "2") or 2)
        self.iou_threshold = _param(params, "nms_iou_threshold", 0.5, 0.0, 1.0)
        self.min_score = _param(params, "min_score", 0.05, 0.0, 1.0)
        self.max_batch = max(1, int(config.get("max_batch_size", 8) or 8))

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isdir(version_dir):
            version_dir = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(version_dir, ONNX_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"{self.name}: missing {path}; run `python -m training.train_detector`")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", 0) or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, opts, providers=providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if "image" not in inputs or inputs["image"].type != "tensor(uint8)" or not {"boxes", "scores"} <= outputs:
            raise RuntimeError(
                f"{self.name}: {path} must take uint8 'image' and give 'boxes' and 'scores'; "
                "re-run `python -m training.train_detector`"
            )
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {path} with {self.session.get_providers()[0]}, {threads} intra-op threads, "
            f"min_score {self.min_score}, NMS IoU {self.iou_threshold}"
        )

    def _parse(self, request) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, "image")
        if tensor is None:
            raise RequestError("missing input 'image'")
        image = tensor.as_numpy()
        if image.dtype != np.uint8:
            raise RequestError(f"input 'image' must be UINT8, got {image.dtype}")
        if image.ndim != 3 or image.shape[1:] != (MODEL_SIZE, MODEL_SIZE) or image.shape[0] < 1:
            raise RequestError(
                f"input 'image' must have shape [batch, {MODEL_SIZE}, {MODEL_SIZE}], got {list(image.shape)}"
            )
        return image

    def _postprocess(self, boxes: np.ndarray, scores: np.ndarray):
        out_boxes = np.zeros((MAX_DETECTIONS, 4), np.float32)
        out_scores = np.zeros((MAX_DETECTIONS,), np.float32)
        out_labels = np.zeros((MAX_DETECTIONS,), np.int32)
        ok = np.isfinite(scores) & np.isfinite(boxes).all(axis=1) & (scores >= self.min_score)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, self.iou_threshold)[:MAX_DETECTIONS]
        n = len(keep)
        out_boxes[:n] = np.clip(boxes[keep], 0.0, float(MODEL_SIZE))
        out_scores[:n] = scores[keep]
        return out_boxes, out_scores, out_labels, n

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []  # (request index, image [b,1024,1024])
        for i, request in enumerate(requests):
            try:
                if hasattr(request, "is_cancelled") and request.is_cancelled():
                    responses[i] = _error(f"{self.name}: request cancelled", cancelled=True)
                    continue
                parsed.append((i, self._parse(request)))
            except RequestError as exc:
                responses[i] = _error(f"{self.name}: {exc}", invalid=True)
            except Exception as exc:  # never let one request take the batch down
                responses[i] = _error(f"{self.name}: could not read the request ({type(exc).__name__})")

        flat = [(i, k) for i, image in parsed for k in range(image.shape[0])]
        images = dict(parsed)
        results: dict[int, list] = {i: [None] * image.shape[0] for i, image in parsed}
        failed: dict[int, str] = {}
        for s in range(0, len(flat), self.max_batch):
            part = flat[s : s + self.max_batch]
            try:
                if len(part) == 1:
                    i, k = part[0]
                    batch = images[i][k : k + 1, None]
                else:
                    batch = np.stack([images[i][k] for i, k in part])[:, None]
                boxes, scores = self.session.run(["boxes", "scores"], {"image": np.ascontiguousarray(batch)})
                for (i, k), b, sc in zip(part, boxes, scores, strict=True):
                    results[i][k] = self._postprocess(b, sc)
            except Exception as exc:
                for i, _ in part:
                    failed[i] = f"{self.name}: inference failed ({type(exc).__name__})"

        for i, _image in parsed:
            if i in failed:
                responses[i] = _error(failed[i])
                continue
            rows = results[i]
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("boxes", np.stack([r[0] for r in rows])),
                    pb_utils.Tensor("scores", np.stack([r[1] for r in rows])),
                    pb_utils.Tensor("labels", np.stack([r[2] for r in rows])),
                    pb_utils.Tensor("count", np.array([[r[3]] for r in rows], dtype=np.int32)),
                ]
            )
        return responses

    def finalize(self):
        self.session = None


def _error(message: str, invalid: bool = False, cancelled: bool = False):
    code = None
    if invalid:
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    elif cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)
