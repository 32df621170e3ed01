"""Windowing and rendering to 8-bit grey: BT.601 luma, the automatic window, one OpenCV pass."""

from __future__ import annotations

import math

import cv2
import numpy as np

from services.imaging.ingest.image import Window

__all__ = ["auto_window", "default_window", "luma", "render"]

_CV_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)}
_AUTO_SAMPLES = 1 << 18


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 grey, kept in the input's range (OpenCV for 8/16-bit and float32)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype in (np.uint8, np.uint16, np.float32):
        return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
    return np.asarray(rgb.astype(np.float64) @ weights)


def auto_window(values: np.ndarray, padding: np.ndarray | None) -> Window:
    """Percentiles 0.5/99.5 of a strided sample (fast on big radiographs), padding excluded."""
    step = max(1, int(math.sqrt(values.size / _AUTO_SAMPLES)))
    sample = values[::step, ::step]
    if padding is not None:
        sample = sample[~padding[::step, ::step]]
    sample = sample.ravel()
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return Window.from_range(0.0, 1.0, source="auto")
    low, high = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if not high > low:
        low, high = float(sample.min()), float(sample.max())
    if not high > low:
        high = low + 1.0
    return Window.from_range(low, high, source="auto")


def render(values: np.ndarray, window: Window, *, invert: bool = False) -> np.ndarray:
    """Values to uint8 through ``window`` (linear in one OpenCV pass, or DICOM's sigmoid).

    ``invert`` (MONOCHROME1, Presentation LUT Shape INVERSE) is folded into the same pass: 255 - y.
    """
    if window.function == "SIGMOID":
        x = values.astype(np.float32)
        y = 255.0 / (1.0 + np.exp(np.float32(-4.0 / window.width) * (x - np.float32(window.center))))
        y = 255.0 - y if invert else y
        return np.asarray(np.rint(y), dtype=np.uint8)
    low, high = window.low, window.high
    if values.dtype == np.uint8 and low == 0.0 and high == 255.0 and not invert:
        return np.ascontiguousarray(values)
    if values.dtype not in _CV_DTYPES:
        values = values.astype(np.float64)
    values = np.ascontiguousarray(values)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if not high > low:
        on, off = (np.uint8(0), np.uint8(255)) if invert else (np.uint8(255), np.uint8(0))
        return np.where(values > low, on, off)
    scale = 255.0 / (high - low)
    alpha, beta = (-scale, 255.0 + low * scale) if invert else (scale, -low * scale)
    # addWeighted saturates to 0..255 and rounds: one multithreaded pass instead of numpy's three.
    return np.asarray(cv2.addWeighted(values, alpha, values, 0.0, beta, dtype=cv2.CV_8U))


def default_window(grey: np.ndarray, *, top: float = 255.0) -> Window:
    """8-bit input keeps its full range (0..``top``); anything else gets the automatic window."""
    if grey.dtype == np.uint8:
        return Window.from_range(0.0, top, source="full_range")
    return auto_window(grey, None)
