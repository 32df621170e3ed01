"""Triton Python-backend model ``segmenter_box``: LiteMedSAM box-prompt segmentation with ONNX Runtime.

Self-contained: numpy, onnxruntime and the standard library only (no torch, no opencv).  The two ONNX graphs
next to this file are built by ``make models`` (``python -m training.export_medsam``):

* ``encoder.onnx``: uint8 [B,1,1024,1024] -> embedding [B,256,64,64] (resize/normalise inside the graph)
* ``decoder.onnx``: embedding [1,256,64,64] + boxes [N,4] (1024 space)
  -> low_res_logits [N,1,256,256], iou_predictions [N], masks uint8 [N,1024,1024] (upsampled, > 0)

Contract (see config.pbtxt): image uint8 [B,1024,1024], boxes fp32 [B,N,4] -> masks uint8 [B,N,1024,1024],
scores fp32 [B,N].  Every request gets exactly one response; a bad request gets an error response naming
the problem (never image content) and the rest of the batch is still served.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

MODEL_SIZE = 1024
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ENCODER_MAX_BATCH = 4


class RequestError(ValueError):
    """A problem with one request; answered with an error response for that request only."""


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.name = args.get("model_name", "segmenter_box")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "2") or 2)
        self.max_boxes = int(params.get("max_boxes_per_image", "64") or 64)
        self.decoder_chunk = max(1, int(params.get("decoder_chunk", "16") or 16))

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isdir(version_dir):
            version_dir = os.path.dirname(os.path.abspath(__file__))
        paths = {name: os.path.join(version_dir, name) for name in (ENCODER_FILE, DECODER_FILE)}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise RuntimeError(
                f"{self.name}: missing ONNX file(s) {', '.join(missing)}; "
                "run `make models` (python -m training.export_medsam) to export LiteMedSAM first"
            )

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if (
            args.get("model_instance_kind") == "GPU"
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            device_id = int(args.get("model_instance_device_id", 0) or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(paths[ENCODER_FILE], opts, providers=providers)
        self.decoder = ort.InferenceSession(paths[DECODER_FILE], opts, providers=providers)
        self._check_graphs()
        pb_utils.Logger.log_info(
            f"{self.name}: LiteMedSAM loaded from {version_dir} with {self.encoder.get_providers()[0]}, "
            f"{threads} intra-op threads, max {self.max_boxes} boxes per image"
        )

    def _check_graphs(self):
        enc_in = {i.name: i for i in self.encoder.get_inputs()}
        dec_in = {i.name: i for i in self.decoder.get_inputs()}
        dec_out = {o.name for o in self.decoder.get_outputs()}
        problems = []
        if "image" not in enc_in or enc_in["image"].type != "tensor(uint8)":
            problems.append("encoder.onnx has no uint8 input 'image'")
        if not {"embedding", "boxes"} <= set(dec_in):
            problems.append("decoder.onnx lacks inputs 'embedding' and 'boxes'")
        if not {"masks", "iou_predictions"} <= dec_out:
            problems.append("decoder.onnx lacks outputs 'masks' and 'iou_predictions'")
        if problems:
            raise RuntimeError(
                f"{self.name}: unexpected ONNX graphs ({'; '.join(problems)}); "
                "re-run `make models` (python -m training.export_medsam --force)"
            )
        self.embedding_name = self.encoder.get_outputs()[0].name

    # ------------------------------------------------------------------------------------------------
    def _parse(self, request):
        image_t = pb_utils.get_input_tensor_by_name(request, "image")
        boxes_t = pb_utils.get_input_tensor_by_name(request, "boxes")
        if image_t is None:
            raise RequestError("missing input 'image'")
        if boxes_t is None:
            raise RequestError("missing input 'boxes'")
        image = image_t.as_numpy()
        boxes = boxes_t.as_numpy()
        if image.dtype != np.uint8:
            raise RequestError(f"input 'image' must be UINT8, got {image.dtype}")
        if image.ndim != 3 or image.shape[1:] != (MODEL_SIZE, MODEL_SIZE) or image.shape[0] < 1:
            raise RequestError(
                f"input 'image' must have shape [batch, {MODEL_SIZE}, {MODEL_SIZE}], got {list(image.shape)}"
            )
        if boxes.dtype != np.float32:
            raise RequestError(f"input 'boxes' must be FP32, got {boxes.dtype}")
        if boxes.ndim != 3 or boxes.shape[2] != 4:
            raise RequestError(f"input 'boxes' must have shape [batch, N, 4], got {list(boxes.shape)}")
        if boxes.shape[0] != image.shape[0]:
            raise RequestError(
                f"input 'boxes' has batch {boxes.shape[0]} but 'image' has batch {image.shape[0]}"
            )
        n = boxes.shape[1]
        if n == 0:
            raise RequestError("no boxes: 'boxes' must hold at least one box [x0, y0, x1, y1] per image")
        if n > self.max_boxes:
            raise RequestError(f"too many boxes: {n} per image, at most {self.max_boxes}")
        finite = np.isfinite(boxes).all(axis=2)
        if not finite.all():
            b, j = np.argwhere(~finite)[0]
            raise RequestError(f"boxes[{b}][{j}] has a NaN or infinite coordinate")
        x0, y0, x1, y1 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
        outside = (x0 < 0) | (y0 < 0) | (x1 > MODEL_SIZE) | (y1 > MODEL_SIZE)
        if outside.any():
            b, j = np.argwhere(outside)[0]
            raise RequestError(
                f"boxes[{b}][{j}] = {_fmt(boxes[b, j])} is outside the {MODEL_SIZE}x{MODEL_SIZE} image "
                f"(need 0 <= x0 < x1 <= {MODEL_SIZE}, 0 <= y0 < y1 <= {MODEL_SIZE})"
            )
        degenerate = (x1 <= x0) | (y1 <= y0)
        if degenerate.any():
            b, j = np.argwhere(degenerate)[0]
            raise RequestError(
                f"boxes[{b}][{j}] = {_fmt(boxes[b, j])} has zero area or is inverted "
                "(need x0 < x1 and y0 < y1)"
            )
        return np.ascontiguousarray(image), np.ascontiguousarray(boxes)

    def _decode(self, embedding, boxes):
        masks = np.empty((boxes.shape[0], MODEL_SIZE, MODEL_SIZE), np.uint8)
        scores = np.empty((boxes.shape[0],), np.float32)
        for s in range(0, boxes.shape[0], self.decoder_chunk):
            chunk = boxes[s : s + self.decoder_chunk]
            m, iou = self.decoder.run(["masks", "iou_predictions"], {"embedding": embedding, "boxes": chunk})
            masks[s : s + len(chunk)] = m
            scores[s : s + len(chunk)] = iou
        np.clip(scores, 0.0, 1.0, out=scores)
        return masks, scores

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []  # (index, image [b,H,W], boxes [b,N,4])
        for i, request in enumerate(requests):
            try:
                if hasattr(request, "is_cancelled") and request.is_cancelled():
                    responses[i] = _error(f"{self.name}: request cancelled", cancelled=True)
                    continue
                image, boxes = self._parse(request)
                parsed.append((i, image, boxes))
            except RequestError as exc:
                responses[i] = _error(f"{self.name}: {exc}", invalid=True)
            except Exception as exc:  # never let one request take the batch down
                responses[i] = _error(f"{self.name}: could not read the request ({type(exc).__name__})")

        # Encoder: every image of every valid request, a few at a time.
        embeddings: dict[int, dict[int, np.ndarray]] = {}
        flat = [(i, k) for i, image, _ in parsed for k in range(image.shape[0])]
        images = {i: image for i, image, _ in parsed}
        failed: dict[int, str] = {}
        for s in range(0, len(flat), ENCODER_MAX_BATCH):
            part = flat[s : s + ENCODER_MAX_BATCH]
            try:
                batch = np.stack([images[i][k] for i, k in part])[:, None]
                out = self.encoder.run([self.embedding_name], {"image": batch})[0]
            except Exception as exc:
                for i, _ in part:
                    failed[i] = f"{self.name}: image encoder failed ({type(exc).__name__})"
                continue
            for (i, k), emb in zip(part, out, strict=True):
                embeddings.setdefault(i, {})[k] = emb[None]

        for i, _image, boxes in parsed:
            if i in failed:
                responses[i] = _error(failed[i])
                continue
            try:
                b, n = boxes.shape[:2]
                masks = np.empty((b, n, MODEL_SIZE, MODEL_SIZE), np.uint8)
                scores = np.empty((b, n), np.float32)
                for k in range(b):
                    masks[k], scores[k] = self._decode(embeddings[i][k], boxes[k])
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("masks", masks), pb_utils.Tensor("scores", scores)]
                )
            except Exception as exc:
                responses[i] = _error(f"{self.name}: mask decoder failed ({type(exc).__name__})")
        return responses

    def finalize(self):
        self.encoder = None
        self.decoder = None


def _fmt(box) -> str:
    return "[" + ", ".join(f"{float(v):.1f}" for v in box) + "]"


def _error(message: str, invalid: bool = False, cancelled: bool = False):
    code = None
    if invalid:
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    elif cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)
