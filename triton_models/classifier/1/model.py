"""Triton Python-backend model ``classifier``: normal vs lesion with ONNX Runtime.

Self-contained: numpy, onnxruntime and the standard library only.  ``model.onnx`` next to this file
is built by ``python -m training.train_classifier``: uint8 image [B,1,1024,1024] -> probabilities
[B,2] (normal, lesion); normalisation happens inside the graph.

Contract (see config.pbtxt): image uint8 [B,1024,1024] -> probabilities fp32 [B,2].  Every request
gets exactly one response; all valid requests of a batch run as one ONNX Runtime call; a bad request
gets an error response naming the problem (never image content) and the rest are still served.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

MODEL_SIZE = 1024
ONNX_FILE = "model.onnx"
OUTPUT = "probabilities"


class RequestError(ValueError):
    """A problem with one request; answered with an error response for that request only."""


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.name = args.get("model_name", "classifier")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "2") or 2)
        self.max_batch = max(1, int(config.get("max_batch_size", 8) or 8))

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isdir(version_dir):
            version_dir = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(version_dir, ONNX_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"{self.name}: missing {path}; run `python -m training.train_classifier`")

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
        outputs = [o.name for o in self.session.get_outputs()]
        if "image" not in inputs or inputs["image"].type != "tensor(uint8)" or OUTPUT not in outputs:
            raise RuntimeError(
                f"{self.name}: {path} must take uint8 'image' and give '{OUTPUT}'; "
                "re-run `python -m training.train_classifier`"
            )
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {path} with {self.session.get_providers()[0]}, {threads} intra-op threads"
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

        # All valid images in one ORT run (chunks of max_batch_size if Triton ever hands more).
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
                probs = self.session.run([OUTPUT], {"image": np.ascontiguousarray(batch)})[0]
            except Exception as exc:
                for i, _ in part:
                    failed[i] = f"{self.name}: inference failed ({type(exc).__name__})"
                continue
            for (i, k), row in zip(part, probs, strict=True):
                results[i][k] = row

        for i, _image in parsed:
            if i in failed:
                responses[i] = _error(failed[i])
                continue
            probs = np.ascontiguousarray(np.stack(results[i]).astype(np.float32))
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, probs)])
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
