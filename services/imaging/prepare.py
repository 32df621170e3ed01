"""Bytes in, model square out: decode, render to 8-bit, letterbox to 1024. Pure CPU work, run off the event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from services.imaging.ingest import DecodedImage, InputKind, decode, decode_array
from services.imaging.limits import IngestLimits
from services.imaging.preprocess import MODEL_SIZE, Letterbox


@dataclass(frozen=True)
class PreparedImage:
    """The letterboxed uint8 model input, its transform, and what was read."""

    model_image: np.ndarray  # (1024, 1024) uint8
    transform: Letterbox
    decoded: DecodedImage
    decode_ms: float
    preprocess_ms: float


def prepare(
    data: bytes | None,
    *,
    array: np.ndarray | None = None,
    kind: InputKind = InputKind.AUTO,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    limits: IngestLimits,
    size: int = MODEL_SIZE,
) -> PreparedImage:
    """Decode ``data`` (or take ``array``) and letterbox it; raises the ingest domain errors only."""
    started = time.perf_counter()
    if array is not None:
        decoded = decode_array(array, window=window, limits=limits)
    else:
        decoded = decode(data or b"", kind=kind, frame=frame, window=window, limits=limits)
    decoded_at = time.perf_counter()
    pixels = decoded.pixels_u8
    transform = Letterbox.for_shape(pixels.shape[0], pixels.shape[1], size)
    model_image = transform.apply(pixels)
    done = time.perf_counter()
    return PreparedImage(
        model_image=model_image,
        transform=transform,
        decoded=decoded,
        decode_ms=(decoded_at - started) * 1000.0,
        preprocess_ms=(done - decoded_at) * 1000.0,
    )
