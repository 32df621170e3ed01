"""Bench-only Python-backend model: the project's classifier in PyTorch, on CUDA when there is one.

The weights are the served ONNX graph's (``training.onnx_checkpoint.load_version``: BatchNorm folded into the
convolutions, exactly), the calibration is the same ``calibration.json``, so the answers match the ONNX Runtime
model's within float rounding (tests/test_gpu_check.py). Tensors cross the stub through DLPack only: the input with
``to_dlpack``, the output with ``Tensor.from_dlpack`` from a torch tensor. That path does not go through
pybind11's view of numpy arrays, which the 2.51 stubs get wrong under numpy 2 (DESIGN.md §7), so this model also
answers under a machine's numpy 2. Not self-contained like ``triton_models/``: it imports ``training`` from this
repository (bench code, run from a checkout).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

sys.dont_write_bytecode = True  # no __pycache__ folders in a model repository (medgate_model_base's docstring)
# bench/gpu/torch_models/classifier/1/model.py, through the symlinked version folder of a scratch repository.
REPO = os.path.realpath(__file__)
for _ in range(6):
    REPO = os.path.dirname(REPO)
for entry in (os.path.join(REPO, "triton_models"), REPO):
    if entry not in sys.path:
        sys.path.insert(0, entry)

MODEL_SIZE = 1024
OUTPUT = "probabilities"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from pathlib import Path

        import torch
        from medgate_calibration import Calibration

        from training.onnx_checkpoint import load_version
        from training.train_classifier import Classifier, Serving

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        wanted = (params.get("device") or "auto").strip().lower()
        if wanted not in {"auto", "cuda", "cpu"}:
            raise RuntimeError(f"classifier (torch): parameter device={wanted!r} must be auto, cuda or cpu")
        self.device = torch.device(
            "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"
        )
        source = params.get("source_version_dir") or os.path.join(REPO, "triton_models", "classifier", "1")
        core, origin = load_version(Path(source), Classifier)
        self.model = Serving(core).to(self.device).eval()
        self.calibration = Calibration.load(source)
        self.torch = torch
        with torch.inference_mode():  # kernels chosen and memory taken before the first request
            self.model(torch.zeros(1, 1, MODEL_SIZE, MODEL_SIZE, dtype=torch.uint8, device=self.device))
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        pb_utils.Logger.log_info(
            f"classifier (torch {torch.__version__}) on {name}, weights from {origin} in {source}, "
            f"{self.calibration.describe()}"
        )

    def _image(self, request: Any) -> Any:
        """The request's image as a torch tensor, through DLPack; ValueError naming what is wrong."""
        from torch.utils import dlpack

        tensor = pb_utils.get_input_tensor_by_name(request, "image")
        if tensor is None:
            raise ValueError("input 'image' is missing")
        image = dlpack.from_dlpack(tensor.to_dlpack())
        if image.dtype != self.torch.uint8 or image.ndim != 3 or tuple(image.shape[1:]) != (MODEL_SIZE, MODEL_SIZE):
            raise ValueError(
                f"input 'image' must be UINT8 [batch, {MODEL_SIZE}, {MODEL_SIZE}], got {list(image.shape)}"
            )
        return image

    def execute(self, requests: list[Any]) -> list[Any]:
        from torch.utils import dlpack

        torch = self.torch
        responses: list[Any] = [None] * len(requests)
        images, owners = [], []
        for i, request in enumerate(requests):
            try:
                image = self._image(request)
            except ValueError as exc:
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                error = pb_utils.TritonError(str(exc), code) if code is not None else pb_utils.TritonError(str(exc))
                responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            images.append(image)
            owners.append((i, image.shape[0]))
        if images:
            try:
                with torch.inference_mode():
                    batch = torch.cat(images).to(self.device, non_blocking=True)
                    lesion_raw = self.model(batch[:, None])[:, 1].float().cpu().numpy()
                lesion = self.calibration("lesion_probability", lesion_raw)
                probabilities = np.stack([1.0 - lesion, lesion], axis=1).astype(np.float32)
                start = 0
                for i, count in owners:
                    part = torch.from_numpy(np.ascontiguousarray(probabilities[start : start + count]))
                    start += count
                    output = pb_utils.Tensor.from_dlpack(OUTPUT, dlpack.to_dlpack(part))
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[output])
            except Exception as exc:  # the batch failed: each of its requests says so (no image content)
                message = f"classifier (torch): inference failed ({type(exc).__name__})"
                for i, _ in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return responses
