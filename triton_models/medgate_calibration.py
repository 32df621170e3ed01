"""Score calibration shipped beside a model's ONNX graph (``calibration.json``) and applied in its ``model.py``.

A plain file at the model repository's root like ``medgate_model_base.py`` (numpy and the standard library
only), so every client of Triton sees the same calibrated numbers. ``training/calibrate.py`` fits the maps on
the calibration seed split of phantoms (never the held-out one) and writes the files. The file::

    {"version": 1, "fitted_on": "...", "scores": {"<name>": MAP, ...}}

where MAP is one of (``then`` optionally chains another MAP after it)::

    {"method": "identity"}
    {"method": "platt", "a": A, "b": B}               p = sigmoid(A * logit(x) + B); temperature: B = 0, A = 1/T
    {"method": "isotonic", "x": [...], "y": [...]}    piecewise-linear through the knots, flat outside
    {"method": "logistic", "features": [...], "weights": [...], "bias": C}
                                                      p = sigmoid(features . weights + C): a score head over named
                                                      statistics the model computes (see segmenter_text/1/model.py)

A missing file means identity everywhere: the raw scores, as before calibration existed.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

FILE = "calibration.json"
METHODS = ("identity", "platt", "isotonic", "logistic")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0))))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1.0 - 1e-6)
    return np.asarray(np.log(p) - np.log1p(-p))


def check_map(spec: Mapping[str, Any], where: str) -> None:
    """ValueError naming ``where`` when ``spec`` is not a usable MAP (checked once, at load)."""
    method = spec.get("method")
    if method not in METHODS:
        raise ValueError(f"{where}: method {method!r} is not one of {', '.join(METHODS)}")
    if method == "platt" and not all(isinstance(spec.get(k), int | float) for k in ("a", "b")):
        raise ValueError(f"{where}: platt needs numbers 'a' and 'b'")
    if method == "isotonic":
        x, y = spec.get("x"), spec.get("y")
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or not x:
            raise ValueError(f"{where}: isotonic needs lists 'x' and 'y' of one non-zero length")
        if any(b < a for a, b in itertools.pairwise(x)) or any(b < a for a, b in itertools.pairwise(y)):
            raise ValueError(f"{where}: isotonic knots must be non-decreasing")
    if method == "logistic":
        names, weights = spec.get("features"), spec.get("weights")
        if not isinstance(names, list) or not isinstance(weights, list) or len(names) != len(weights):
            raise ValueError(f"{where}: logistic needs 'features' and 'weights' of one length")
        if not isinstance(spec.get("bias"), int | float):
            raise ValueError(f"{where}: logistic needs a number 'bias'")
    if "then" in spec:
        check_map(spec["then"], where + ".then")


def apply_map(spec: Mapping[str, Any], x: np.ndarray, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """``spec`` applied to scores ``x`` (any shape), float32; ``features`` feeds a logistic head (same shape)."""
    method = spec["method"]
    values = np.asarray(x, dtype=np.float64)
    if method == "platt":
        out = _sigmoid(float(spec["a"]) * _logit(values) + float(spec["b"]))
    elif method == "isotonic":
        out = np.interp(values, np.asarray(spec["x"], np.float64), np.asarray(spec["y"], np.float64))
    elif method == "logistic":
        if features is None:
            raise ValueError("a logistic score head needs the model's features")
        z = np.full(values.shape, float(spec["bias"]))
        for name, weight in zip(spec["features"], spec["weights"], strict=True):
            z = z + float(weight) * np.asarray(features[name], dtype=np.float64)
        out = _sigmoid(z)
    else:
        out = values
    if "then" in spec:
        return apply_map(spec["then"], out, features)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class Calibration:
    """The maps of one model, by score name; a name without a map is returned unchanged."""

    def __init__(self, maps: Mapping[str, Mapping[str, Any]], source: str = "") -> None:
        for name, spec in maps.items():
            check_map(spec, f"{source or 'calibration'}: scores.{name}")
        self.maps = dict(maps)
        self.source = source

    @classmethod
    def load(cls, folder: str) -> Calibration:
        """``folder``/calibration.json, or identity everywhere when it is absent; ValueError when it is malformed."""
        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            return cls({}, "")
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("scores"), dict):
            raise ValueError(f"{path}: expected {{'version': 1, 'scores': {{...}}}}")
        return cls(data["scores"], path)

    def __contains__(self, name: str) -> bool:
        return name in self.maps

    def __call__(self, name: str, x: np.ndarray, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        spec = self.maps.get(name)
        if spec is None:
            return np.asarray(x, dtype=np.float32)
        return apply_map(spec, x, features)

    def describe(self) -> str:
        """For the load log line: which scores are calibrated, and how."""
        if not self.maps:
            return "raw scores (no calibration.json)"
        return "calibrated " + ", ".join(f"{k} ({v['method']})" for k, v in sorted(self.maps.items()))


def mask_features(raw_scores: np.ndarray, areas: np.ndarray, peaks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The statistics a mask's score head reads, from what a segmentation graph gives per mask.

    ``raw_scores``: mean foreground probability inside the mask (0 when empty); ``areas``: mask pixels; ``peaks``:
    the channel's highest probability anywhere in the image (None: not given). ``logit_score`` is that mean on
    the logit scale (the text segmenter's lesion channel keeps its probabilities in 0.5..0.56, so the spread that
    tells good masks from bad lives in the logit's first decimals); ``log_area`` is log(1 + pixels); ``empty`` is
    1 for an empty mask, whose other features are 0 but ``empty_peak``, the logit of its peak (a nodule the model
    just missed lifts it towards 0.5; a clean image leaves it near 0).
    """
    area = np.asarray(areas, dtype=np.float64)
    empty = (area <= 0).astype(np.float64)
    peak = np.zeros_like(area) if peaks is None else np.asarray(peaks, dtype=np.float64)
    return {
        "empty": empty,
        "logit_score": np.where(empty > 0, 0.0, _logit(raw_scores)),
        "log_area": np.log1p(np.maximum(area, 0.0)),
        "empty_peak": np.where(empty > 0, _logit(peak) if peaks is not None else 0.0, 0.0),
    }
