"""A review case's 16-bit image: a grey DICOM frame's modality values, letterboxed exactly like the model image.

The 8-bit model image is already windowed: a reviewer cannot find lung detail in a soft-tissue window from
it. This keeps the values after the Modality LUT or rescale (Hounsfield units for CT), before any VOI
window, so the reviewer page can window/level the original values.

Letterboxed to the model square rather than kept at the original size: every overlay of a case (boxes,
masks) is in that square, so the page draws one coordinate system; the PNG stays bounded (about 1-2 MB
for 1024x1024) whatever the modality wrote (a 4k x 4k radiograph would be 32 MB of 16-bit values); and
the reviewer judges what the model saw. Values are stored as ``round((value - offset) / scale)``: integer
data spanning at most 65535 keeps ``scale`` 1 (exact, 1 HU); float or wider data is spread over 0..65535.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from services.imaging.ingest import InputKind
from services.imaging.prepare import PreparedImage

MODALITY_IMAGE_NAME = "modality.png"
_U16_MAX = 65535


@dataclass(frozen=True)
class ModalityImage:
    """The 16-bit PNG and what the page needs to read it (``input_content_json``'s ``modalityImage``)."""

    png: bytes
    meta: dict[str, Any]


def modality_image(prepared: PreparedImage) -> ModalityImage | None:
    """The modality values of a grey DICOM frame as a letterboxed 16-bit PNG; None for anything else."""
    decoded = prepared.decoded
    source = decoded.source
    if decoded.kind is not InputKind.DICOM or source.ndim != 2 or source.shape != decoded.pixels_u8.shape:
        return None  # colour, palette and non-DICOM inputs: the 8-bit image is all there is
    values = source.astype(np.float32)  # exact for integers below 2**24 (every stored DICOM value)
    if not np.isfinite(values).all():
        return None
    t = prepared.transform
    letterboxed = t.apply(values)
    inside = (slice(t.pad_top, t.pad_top + t.resized_height), slice(t.pad_left, t.pad_left + t.resized_width))
    content = letterboxed[inside]
    low, high = float(content.min()), float(content.max())
    if source.dtype.kind in "biu" and high - low <= _U16_MAX:
        offset, scale = float(math.floor(low)), 1.0
    else:
        offset, scale = low, (high - low) / _U16_MAX if high > low else 1.0
    stored = np.zeros(letterboxed.shape, np.uint16)  # padding: 0; the page paints it black
    stored[inside] = np.clip(np.rint((content - offset) / scale), 0, _U16_MAX).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", stored, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of the 16-bit review image failed")
    window = decoded.info.window
    meta = {
        "object": MODALITY_IMAGE_NAME,
        "offset": offset,
        "scale": scale,
        "min": low,
        "max": high,
        "modality": decoded.info.identity.modality,
        "photometric": decoded.info.photometric_interpretation,
        "invert": _inverted(content, prepared.model_image[inside], decoded.info.photometric_interpretation),
        "window": {"center": window.center, "width": window.width, "source": window.source},
    }
    return ModalityImage(bytes(encoded.tobytes()), meta)


def _inverted(values: np.ndarray, rendered: np.ndarray, photometric: str) -> bool:
    """Whether the model image shows high values dark (MONOCHROME1, or a Presentation LUT Shape INVERSE):
    read from the rendering itself, so the page's default view matches what the model saw."""
    brightest, darkest = int(np.argmax(values)), int(np.argmin(values))
    high, low = int(rendered.flat[brightest]), int(rendered.flat[darkest])
    return high < low if high != low else photometric == "MONOCHROME1"
