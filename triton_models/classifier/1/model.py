"""Triton Python-backend model ``classifier``: normal vs lesion with ONNX Runtime.

Self-contained: numpy, onnxruntime, the standard library and ``medgate_model_base.py`` at the repository root;
with config.pbtxt parameter ``runtime: torch``, PyTorch instead of onnxruntime (``medgate_torch_nets.py``, the
same network with the weights of the same ``model.onnx``, on CUDA when torch sees a GPU).
``model.onnx`` next to this file is built by ``python -m training.train_classifier``: uint8 image
[B,1,1024,1024] -> probabilities [B,2] (normal, lesion); normalisation happens inside the graph.
``calibration.json`` beside it (``python -m training.fit_calibration``) holds the temperature applied here to the
lesion logit, so that the top-class probability matches how often the class is right; the 0.5 decision is kept.

Contract (see config.pbtxt): image uint8 [B,1024,1024] -> probabilities fp32 [B,2].  Every request
gets exactly one response; all valid requests of a batch run as one ONNX Runtime call; a bad request
gets an error response naming the problem (never image content) and the rest are still served.
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
from medgate_model_base import ImageBatchModel, Outputs, check_images, input_array  # noqa: E402

OUTPUT = "probabilities"


class TritonPythonModel(ImageBatchModel[None, np.ndarray]):
    default_name = "classifier"
    graph_outputs = (OUTPUT,)
    rebuild = "python -m training.train_classifier"
    torch_net = "classifier"

    def setup(self, args: dict[str, str]) -> None:
        self.calibration = Calibration.load(self.version_dir)
        super().setup(args)

    def details(self) -> str:
        return ", " + self.calibration.describe()

    def parse(self, request: pb_utils.InferenceRequest) -> tuple[np.ndarray, None]:
        return check_images(input_array(request, "image")), None

    def run_images(self, images: np.ndarray, rows: list[tuple[None, int]]) -> list[np.ndarray]:
        probabilities = self.run_graph([OUTPUT], images)[0]
        lesion = self.calibration("lesion_probability", probabilities[:, 1])
        return list(np.stack([1.0 - lesion, lesion], axis=1).astype(np.float32))

    def respond(self, extra: None, results: list[np.ndarray]) -> Outputs:
        return [pb_utils.Tensor(OUTPUT, np.ascontiguousarray(np.stack(results).astype(np.float32)))]
