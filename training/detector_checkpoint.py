"""The detector's torch weights from its shipped ONNX graph, exactly (:mod:`training.onnx_checkpoint` does the work).

``train_detector.py`` keeps no checkpoint; :func:`detector_from_onnx` recovers the weights Triton serves (BatchNorm
folded into the convolutions, frozen), :func:`max_difference` checks the scores against ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training import onnx_checkpoint
from training.train_detector import Detector, Serving


def detector_from_onnx(path: Path) -> Detector:
    """A :class:`Detector` whose forward pass equals the ONNX graph's at ``path`` (BatchNorm folded, frozen)."""
    return onnx_checkpoint.weights_from_onnx(Detector(), path)


def load_detector(version_dir: Path) -> tuple[Detector, str]:
    """The detector of a version folder: its ``model.pt`` when fine-tuning saved one, else from ``model.onnx``."""
    return onnx_checkpoint.load_version(version_dir, Detector)


def max_difference(model: Detector, onnx_path: Path, images: np.ndarray) -> float:
    """Largest absolute difference of the scores between ``model`` and the ONNX graph on ``images`` [N,1024,1024]."""
    return onnx_checkpoint.max_difference(Serving(model), onnx_path, images, output=1)
